"""Slicer's "Fill between slices" (ITK MorphologicalContourInterpolator) as a prior.

The model does not compete with the classical interpolation: between two labelled slices it is
given the interpolated contour as its prior channel and learns to correct it (training's
prior-correction episodes, inference's propagation between labelled slices). This module crops
to the labelled structure (ITK's cost grows with the whole slice) and picks one of three backends
for the same operation:

- "vtkitk": Slicer's own wrapping of the filter (`vtkITK.vtkITKMorphologicalContourInterpolator`),
  used inside Slicer only, where it is the only ITK allowed: pip's `itk` in Slicer's process
  crashes it (version skew with Slicer's ITK). The `slicer-core` wheel ships the same class
  (`slicer_core.vtkITK`, loads in ~1 s) but a process that ran it segfaults when ITK's worker
  threads exit (thread-local filters of the interpolator are destroyed after their library), so
  outside Slicer it is not used.
- "itk": pip's `itk` + `itk-morphologicalcontourinterpolation`. Same filter, same output, but
  its lazy import costs ~10 s and its first call ~15 s more per process (template loading).
- "distance": no ITK at all: signed-distance interpolation between consecutive labelled slices
  (scipy's Euclidean distance transform). Hand-written because no library offers shape-based
  interpolation of a binary stack; it is the classical method (Raya & Udupa 1990) that ITK's
  filter refines with per-component matching, and it stands in where no ITK is installed.

Both ITK backends run with the filter's distance-transform option on (pip's default; vtkITK's
default is off) so they give identical results.

Which one runs by default (measured with `python -m medgen_dev.bench.interp --with-model`, the
model's propagation Dice with each prior on the bench's 15 structures): with 5 or more labelled
slices the distance prior is as good as ITK's (mean Dice +0.009 at 5, +0.014 at 8; ITK's
heuristic alignment loses whole stretches of the spleen, aorta and a kidney at 8) and costs no
import; with fewer, far-apart slices ITK's matching of pieces is better (-0.045 at 3), so ITK
runs when it is installed. The bench's "fill between slices" baseline always uses ITK (SLICER).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from medgen.core.errors import InputError

# first importable backend wins (below DENSE labelled slices)
PREFERENCE: tuple[str, ...] = ("vtkitk", "itk", "distance")
SLICER: tuple[str, ...] = ("vtkitk", "itk")  # Slicer's own tool, for baselines that must be it
DENSE = 5  # from this many labelled slices on, the distance backend measures as good as ITK


@functools.cache
def _vtkitk():
    import vtkITK  # Slicer's module (top level only inside Slicer)
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonDataModel import vtkImageData

    vtkITK.vtkITKMorphologicalContourInterpolator  # noqa: B018 (older Slicers lack it)
    return vtkITK, numpy_support, vtkImageData


@functools.cache
def _itk():
    import itk

    itk.MorphologicalContourInterpolator  # noqa: B018 (the filter is a separate wheel)
    return itk


def _loads(name: str) -> bool:
    if name == "distance":
        return True
    try:
        (_vtkitk if name == "vtkitk" else _itk)()
        return True
    except (ImportError, AttributeError):
        return False


def backend(preference: tuple[str, ...] | None = None) -> str:
    """The first backend of `preference` (default PREFERENCE) that loads here."""
    for name in preference or PREFERENCE:
        if name not in ("vtkitk", "itk", "distance"):
            raise InputError(f"unknown fill-between-slices backend {name!r}: use vtkitk, itk or distance")
        if _loads(name):
            return name
    raise InputError("fill between slices needs ITK's contour interpolator: install slicer-core, "
                     "or pip install itk itk-morphologicalcontourinterpolation")


def available() -> bool:
    """Whether fill between slices can run (without importing ITK when the distance backend,
    which needs none, is among the choices)."""
    if "distance" in PREFERENCE:
        return True
    try:
        backend()
        return True
    except InputError:
        return False


def fill_between_slices(masks: np.ndarray, given: list[int], margin: int = 4,
                        backend_name: str | None = None) -> np.ndarray:
    """Binary interpolation along axis 0 of a slices-first stack from the slices in `given`.

    Only the labelled slices of `masks` are read. Slices outside [min(given), max(given)] stay
    empty, as in Slicer. The work is done on the crop around the labelled foreground. Without
    `backend_name`, DENSE or more labelled slices use the distance backend, fewer the first of
    PREFERENCE that loads."""
    out = np.zeros(masks.shape, bool)
    given = sorted({int(g) for g in given if np.any(masks[int(g)])})  # empty = unlabelled, as in ITK
    if not given:
        return out
    name = backend_name or ("distance" if len(given) >= DENSE and "distance" in PREFERENCE else backend())
    rows = np.nonzero(np.any([masks[g] for g in given], axis=(0, 2)))[0]
    cols = np.nonzero(np.any([masks[g] for g in given], axis=(0, 1)))[0]
    r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, masks.shape[1])
    c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, masks.shape[2])
    z0, z1 = given[0], given[-1] + 1
    if name == "distance":
        out[z0:z1, r0:r1, c0:c1] = _distance_fill(masks[:, r0:r1, c0:c1], given)
        return out
    # 16-bit: the filter labels connected pieces in the input's pixel type (more than 255 pieces
    # of a fragmented structure overflow 8 bits and ITK raises)
    part = np.zeros((z1 - z0, r1 - r0, c1 - c0), np.uint16)
    for g in given:
        part[g - z0] = masks[g, r0:r1, c0:c1] > 0
    out[z0:z1, r0:r1, c0:c1] = (_vtkitk_fill(part) if name == "vtkitk" else _itk_fill(part)) > 0
    return out


def _itk_fill(part: np.ndarray) -> np.ndarray:
    itk = _itk()
    # itk-morphologicalcontourinterpolation 2.1.2 corrupts the heap when threaded (malloc aborts
    # later, at the latest at exit). Its inner filters take the process-wide default thread
    # count when they are made, so that default is 1 during this call only and given back after:
    # the host process (a notebook, Slicer's Python console) keeps its own setting.
    threads = itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
    try:
        f = itk.MorphologicalContourInterpolator.New(itk.image_from_array(part))
        f.SetAxis(2)  # ITK's axis 2 = numpy's axis 0
        f.Update()
        return np.array(itk.array_view_from_image(f.GetOutput()))
    finally:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)


def _vtkitk_fill(part: np.ndarray) -> np.ndarray:
    vtkITK, numpy_support, vtkImageData = _vtkitk()
    image = vtkImageData()
    image.SetDimensions(part.shape[2], part.shape[1], part.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(part.ravel(), deep=True))
    f = vtkITK.vtkITKMorphologicalContourInterpolator()
    f.SetInputData(image)
    f.SetAxis(2)
    f.SetUseDistanceTransform(True)  # as pip itk's default: the two backends agree voxel for voxel
    f.Update()
    out = numpy_support.vtk_to_numpy(f.GetOutput().GetPointData().GetScalars())
    return out.reshape(part.shape).copy()


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Negative inside, positive outside, +-0.5 at the pixel boundary (so zero stays exact)."""
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    return np.where(mask, 0.5 - inside, outside - 0.5).astype(np.float32)


def _distance_fill(masks: np.ndarray, given: list[int]) -> np.ndarray:
    """Shape-based interpolation: between consecutive labelled slices a and b, slice s is inside
    where the distance maps of a and b, weighted by nearness, say inside."""
    z0 = given[0]
    out = np.zeros((given[-1] + 1 - z0,) + masks.shape[1:], bool)
    sdf = {g: _signed_distance(masks[g] > 0) for g in given}
    for a, b in zip(given[:-1], given[1:]):
        for s in range(a + 1, b):
            w = (s - a) / (b - a)
            out[s - z0] = (1 - w) * sdf[a] + w * sdf[b] < 0
    for g in given:
        out[g - z0] = masks[g] > 0
    return out
