"""Speed and memory by design: fill-between-slices backends, no ITK import where it is not needed,
host thread settings left alone, and numpy memory of a segmentation bounded by a small multiple
of the volume (not one full float copy per label and per step of the overlap rule).

Real data: the shipped MNI152 sample's tissue labels and a pyradiomics lesion from ../shared/data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk

from medgen_helpers import REPO_ROOT, SAMPLE_T1, SAMPLE_TISSUE, SHARED_DATA

from medgen.infer import interpolate


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def white_matter() -> np.ndarray:
    """The MNI sample's white matter (label 2), axial slices first."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_TISSUE))) == 2


def test_distance_backend_interpolates_real_anatomy(white_matter: np.ndarray) -> None:
    given = list(range(30, 48, 3))  # every third 2 mm slice, as a user labels a folded structure
    out = interpolate.fill_between_slices(white_matter, given, backend_name="distance")
    for g in given:  # labelled slices are kept exactly
        assert np.array_equal(out[g], white_matter[g])
    assert not out[:given[0]].any() and not out[given[-1] + 1:].any()  # nothing outside the span
    inner = np.setdiff1d(np.arange(given[0] + 1, given[-1]), given)
    assert _dice(out[inner], white_matter[inner]) > 0.8


def test_itk_and_distance_agree_and_itk_keeps_thread_count() -> None:
    itk = pytest.importorskip("itk")
    if not (SHARED_DATA / "pyradiomics").is_dir():
        pytest.skip(f"needs ../shared/data ({SHARED_DATA})")
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(SHARED_DATA / "pyradiomics" / "lung2_label.nrrd"))) > 0
    present = np.nonzero(lesion.any((1, 2)))[0]
    given = [int(present[0]), int(present[len(present) // 2]), int(present[-1])]
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(2)
    by_itk = interpolate.fill_between_slices(lesion, given, backend_name="itk")
    assert itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == 2  # the host's setting survives
    by_distance = interpolate.fill_between_slices(lesion, given, backend_name="distance")
    inner = np.setdiff1d(np.arange(given[0] + 1, given[-1]), given)
    assert _dice(by_itk[inner], lesion[inner]) > 0.7 and _dice(by_distance[inner], lesion[inner]) > 0.7
    assert _dice(by_itk[inner], by_distance[inner]) > 0.8


def test_no_itk_import_with_enough_labelled_slices(white_matter: np.ndarray, tmp_path) -> None:
    """A fresh process filling from DENSE labelled slices never pays ITK's import (~10 s)."""
    np.save(tmp_path / "wm.npy", white_matter)
    code = ("import sys, numpy as np; from medgen.infer import interpolate as I; "
            f"m = np.load({str(tmp_path / 'wm.npy')!r}); "
            f"I.fill_between_slices(m, list(range(30, 30 + 4 * I.DENSE, 4))); "
            "assert I.available(); print('itk' in sys.modules, I.backend())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT / "MedicalGeneralist")))
    assert done.returncode == 0, done.stderr
    imported, _ = done.stdout.split()
    assert imported == "False"


def test_unknown_backend_is_refused() -> None:
    from medgen.core.errors import InputError

    with pytest.raises(InputError, match="unknown fill-between-slices backend"):
        interpolate.backend(("gpu",))


@pytest.mark.model
def test_segmentation_numpy_memory_is_bounded(model) -> None:
    """Two labels over 40 slices of the MNI sample upsampled to 192x192: numpy's peak during the
    run (traced after a warm-up run, so imports do not count) stays under 6.5 float32 volumes
    (both labels' probabilities are 2, fill priors, best and output 1.5; measured 5.1; before,
    the division, the float16 copy and the overlap rule's int64 temporaries made it 9.8)."""
    from medgen.core.volume import Volume
    from medgen.infer.pipeline import RunOptions, run
    from medgen.prompts import pairs_from_volumes

    t1, tissue = sitk.ReadImage(str(SAMPLE_T1), sitk.sitkFloat32), sitk.ReadImage(str(SAMPLE_TISSUE))
    size = (192, 192, 40)
    spacing = [sz * sp / n for sz, sp, n in zip(t1.GetSize(), t1.GetSpacing(), size)]
    args = (size, sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(), spacing, t1.GetDirection())
    img = sitk.GetArrayFromImage(sitk.Resample(t1, *args))
    lab = sitk.GetArrayFromImage(sitk.Resample(tissue, args[0], args[1], sitk.sitkNearestNeighbor, *args[3:]))
    vol = Volume(img, tuple(spacing), t1.GetOrigin(), t1.GetDirection())
    small = Volume(img[:12, 60:124, 60:124].copy(), tuple(spacing), t1.GetOrigin(), t1.GetDirection())
    run(model, small, pairs_from_volumes(small, small.with_array(lab[:12, 60:124, 60:124].copy()), 0,
                                         [1, 3, 5, 7, 9], "segment", "mr", own=True), RunOptions("segment", 0, "mr", "cpu"))
    examples = pairs_from_volumes(vol, vol.with_array(lab), 0, [6, 13, 20, 27, 34], "segment", "mr", own=True)
    tracemalloc.start()
    try:
        out = run(model, vol, examples, RunOptions("segment", 0, "mr", "cpu"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert set(np.unique(out.array)) == {0, 1, 2}
    assert peak < 6.5 * img.nbytes, f"numpy peak {peak / img.nbytes:.1f} float32 volumes"
