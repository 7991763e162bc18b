"""Slicer's "Fill between slices" (ITK MorphologicalContourInterpolator) as a prior.

The model does not compete with the classical interpolation: between two labelled slices it is
given the interpolated contour as its prior channel and learns to correct it (training's
prior-correction episodes, inference's propagation between labelled slices). ITK does the
interpolation; this module only crops to the labelled structure (ITK's cost grows with the whole
slice) and handles the optional wheel.
"""

from __future__ import annotations

import numpy as np

from medgen.core.errors import InputError


def _itk():
    try:
        import itk
        itk.morphological_contour_interpolator  # noqa: B018 (the filter is a separate wheel)
    except (ImportError, AttributeError) as err:
        raise InputError("fill between slices needs ITK's contour interpolator: "
                         "pip install itk itk-morphologicalcontourinterpolation") from err
    # itk-morphologicalcontourinterpolation 2.1.2 corrupts the heap when threaded on 512x512
    # slices (malloc aborts on the next call): one thread
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
    return itk


def available() -> bool:
    try:
        _itk()
        return True
    except InputError:
        return False


def fill_between_slices(masks: np.ndarray, given: list[int], margin: int = 4) -> np.ndarray:
    """Binary interpolation along axis 0 of a slices-first stack from the slices in `given`.

    Only the labelled slices of `masks` are read. Slices outside [min(given), max(given)] stay
    empty, as in Slicer. The work is done on the crop around the labelled foreground."""
    itk = _itk()
    out = np.zeros(masks.shape, bool)
    given = sorted(int(g) for g in given)
    known = np.zeros(masks.shape, bool)
    known[given] = masks[given] > 0
    rows, cols = np.nonzero(known.any((0, 2)))[0], np.nonzero(known.any((0, 1)))[0]
    if rows.size == 0:
        return out
    r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, masks.shape[1])
    c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, masks.shape[2])
    z0, z1 = given[0], given[-1] + 1
    # 16-bit: the filter labels connected pieces in the input's pixel type (more than 255 pieces
    # of a fragmented structure overflow 8 bits and ITK raises)
    part = np.ascontiguousarray(known[z0:z1, r0:r1, c0:c1].astype(np.uint16))
    filled = itk.morphological_contour_interpolator(itk.image_from_array(part), axis=2)
    out[z0:z1, r0:r1, c0:c1] = itk.array_from_image(filled) > 0
    return out
