"""`medgen` end to end with the shipped model, on small real cases.

Each run checks the contract a caller relies on: exit code 0, the output file exists, its dtype
(labels: integers with the examples' values; image tasks: float32) and its grid, which must be
exactly the input's. Quality is not asserted here (the model is being retrained): see
test_propagation.py for the one quality figure that is recorded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medgen_helpers import (SAMPLE_T1, SAMPLE_TISSUE, Case, assert_same_geometry, files_in, like,
                            sitk_slab, write_case)
from medgen import cli

pytestmark = pytest.mark.model  # every test here runs the CLI on the shipped weights


def _medgen(*argv: str) -> int:
    return cli.main(["run", *argv, "--device", "cpu"])


def _read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def _check_labels(out: Path, reference: Path, values: set[int]) -> np.ndarray:
    assert out.is_file()
    image, array = _read(out)
    assert_same_geometry(image, sitk.ReadImage(str(reference)))
    assert array.dtype.kind in "ui", array.dtype
    assert set(np.unique(array).tolist()) <= values | {0}
    return array


def _check_image(out: Path, reference: Path) -> np.ndarray:
    assert out.is_file()
    image, array = _read(out)
    assert_same_geometry(image, sitk.ReadImage(str(reference)))
    assert image.GetPixelID() == sitk.sitkFloat32
    assert np.isfinite(array).all()
    return array


# -- segmentation ---------------------------------------------------------------------------------
def test_segment_propagation_in_one_volume(small_case: Case, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "seg.nii.gz"
    out.parent.mkdir()
    code = _medgen("--task", "segment", "--image", str(small_case.image), "--context-target",
                   str(small_case.labels), "--context-slices", small_case.slices_arg, "--modality", "mr",
                   "--out", str(out))  # not quiet: the progress bar and messages go to stderr only
    assert code == 0
    assert str(out) in capsys.readouterr().err  # progress and messages go to stderr
    array = _check_labels(out, small_case.image, {3, 7})
    assert {3, 7} <= set(np.unique(array).tolist())
    for s in small_case.given:
        np.testing.assert_array_equal(array[s], small_case.truth[s])
    between = [s for s in range(small_case.n) if s not in small_case.given]
    assert (array[between] != 0).any(), "propagation labelled nothing between the examples"
    assert files_in(out.parent) == ["seg.nii.gz"]


def test_segment_default_slices_are_the_labelled_ones(small_case: Case, tmp_path: Path) -> None:
    """Without --context-slices every slice that holds a label is an example: all are copied."""
    labels_img = sitk.ReadImage(str(small_case.labels))
    sparse = np.zeros_like(small_case.truth)
    sparse[[0, 9]] = small_case.truth[[0, 9]]
    sitk.WriteImage(like(sparse, labels_img), str(tmp_path / "sparse.nrrd"))
    out = tmp_path / "seg.nrrd"
    assert _medgen("--task", "segment", "--image", str(small_case.image), "--context-target",
                   str(tmp_path / "sparse.nrrd"), "--axis", "axial", "--out", str(out), "--quiet") == 0
    array = _check_labels(out, small_case.image, {3, 7})
    np.testing.assert_array_equal(array[[0, 9]], small_case.truth[[0, 9]])


def test_segment_cross_volume_pairs(small_case: Case, tmp_path: Path) -> None:
    """Examples from two other slabs of the sample (repeatable --context-image/--context-target)."""
    argv = ["--task", "segment", "--image", str(small_case.image), "--quiet", "--modality", "mr"]
    for lo, hi in ((22, 30), (52, 60)):
        other = write_case(tmp_path / f"other_{lo}", lo, hi)
        argv += ["--context-image", str(other.image), "--context-target", str(other.labels)]
    out = tmp_path / "cross.nii.gz"
    assert _medgen(*argv, "--context-slices", "3,5", "--out", str(out)) == 0
    array = _check_labels(out, small_case.image, {3, 7})
    assert (array != 0).any()


def test_segment_2d_png_with_2d_pairs(tmp_path: Path, shared_data: Path) -> None:
    """A BUSI ultrasound image segmented from two other images' hand-drawn masks (as label 5)."""
    busi = shared_data / "busi"
    argv = ["--task", "segment", "--image", str(busi / "images" / "benign_001.png"), "--modality", "us"]
    for name in ("benign_002", "benign_003"):
        mask = sitk.Cast(sitk.ReadImage(str(busi / "masks" / f"{name}.png")), sitk.sitkUInt8) * 5
        sitk.WriteImage(mask, str(tmp_path / f"{name}_mask.png"))
        argv += ["--context-image", str(busi / "images" / f"{name}.png"),
                 "--context-target", str(tmp_path / f"{name}_mask.png")]
    out = tmp_path / "out" / "lesion.png"
    out.parent.mkdir()
    assert _medgen(*argv, "--out", str(out), "--quiet") == 0
    image, array = _read(out)
    assert image.GetDimension() == 2
    assert image.GetSize() == sitk.ReadImage(str(busi / "images" / "benign_001.png")).GetSize()
    assert array.dtype == np.uint8 and set(np.unique(array).tolist()) <= {0, 5}
    assert files_in(out.parent) == ["lesion.png"]


# -- image tasks ----------------------------------------------------------------------------------
def _rician(clean: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sigma = 0.08 * float(np.percentile(clean, 99))
    real = clean + rng.normal(0, sigma, clean.shape)
    return np.sqrt(real ** 2 + rng.normal(0, sigma, clean.shape) ** 2).astype(np.float32)


def test_denoise_from_clean_noisy_pairs(tmp_path: Path) -> None:
    query = sitk_slab(SAMPLE_T1, 40, 44)
    context = sitk_slab(SAMPLE_T1, 50, 56)
    noisy_q = like(_rician(sitk.GetArrayFromImage(query).astype(np.float32), 1), query)
    noisy_c = like(_rician(sitk.GetArrayFromImage(context).astype(np.float32), 2), context)
    for name, img in (("noisy.nii.gz", noisy_q), ("ctx_noisy.nii.gz", noisy_c), ("ctx_clean.nii.gz", context)):
        sitk.WriteImage(img, str(tmp_path / name))
    out = tmp_path / "denoised.nii.gz"
    assert _medgen("--task", "denoise", "--image", str(tmp_path / "noisy.nii.gz"), "--context-image",
                   str(tmp_path / "ctx_noisy.nii.gz"), "--context-target", str(tmp_path / "ctx_clean.nii.gz"),
                   "--context-slices", "1,4", "--modality", "mr", "--out", str(out), "--quiet") == 0
    array = _check_image(out, tmp_path / "noisy.nii.gz")
    assert array.shape == (4, 94, 77) and array.std() > 0


def test_inpaint_with_mask_and_no_context(small_case: Case, tmp_path: Path) -> None:
    """Examples are made from the image itself; every voxel outside the mask is kept exactly."""
    image = sitk.ReadImage(str(small_case.image))
    original = sitk.GetArrayFromImage(image).astype(np.float32)
    mask = np.zeros(original.shape, np.uint8)
    mask[4:6, 40:52, 30:44] = 1
    holed = np.where(mask > 0, 0, original).astype(np.float32)
    sitk.WriteImage(like(holed, image), str(tmp_path / "holed.nii.gz"))
    sitk.WriteImage(like(mask, image), str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "filled.nii.gz"
    assert _medgen("--task", "inpaint", "--image", str(tmp_path / "holed.nii.gz"), "--mask",
                   str(tmp_path / "mask.nii.gz"), "--modality", "mr", "--out", str(out), "--quiet") == 0
    filled = _check_image(out, tmp_path / "holed.nii.gz")
    outside = mask == 0
    np.testing.assert_array_equal(filled[outside], holed[outside])
    assert not np.array_equal(filled[~outside], holed[~outside]), "the hole was not filled at all"


def test_synthesize_t1_to_t2(tmp_path: Path, shared_data: Path) -> None:
    """BraTS TCGA-DU-7294: T1 -> T2 on a 6-slice crop, examples = 2 slices of the T2 itself."""
    subject = shared_data / "brats" / "TCGA-DU-7294"
    crop = lambda name: sitk.ReadImage(str(subject / f"{name}.nii.gz"))[54:182, 52:212, 70:76]
    t1, t2 = crop("t1"), crop("t2")
    assert t1.GetSize() == (128, 160, 6)
    sitk.WriteImage(t1, str(tmp_path / "t1.nii.gz"))
    sitk.WriteImage(t2, str(tmp_path / "t2.nii.gz"))
    out = tmp_path / "t2_synth.nii.gz"
    assert _medgen("--task", "synthesize", "--image", str(tmp_path / "t1.nii.gz"), "--context-target",
                   str(tmp_path / "t2.nii.gz"), "--context-slices", "0,5", "--modality", "mr",
                   "--out", str(out), "--quiet") == 0
    synth = _check_image(out, tmp_path / "t1.nii.gz")
    assert synth.shape == (6, 160, 128) and synth.std() > 0


# -- models, console script, demo ---------------------------------------------------------------
def test_models_list_and_verify(capsys) -> None:
    assert cli.main(["models", "list"]) == 0
    listed = capsys.readouterr().out
    assert "medgen-small" in listed and "available" in listed
    assert cli.main(["models", "verify", "medgen-small"]) == 0
    assert "medgen-small: OK" in capsys.readouterr().out


def test_console_script_lists_models(tmp_path: Path) -> None:
    script = shutil.which("medgen", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                          os.environ.get("PATH", "")]))
    if script is None:
        pytest.skip("the `medgen` console script is not installed (pip install -e . creates it)")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([script, "models", "list"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    default = [line for line in done.stdout.splitlines() if line.startswith("*")]
    from medgen.io.weights import load_registry

    assert len(default) == 1 and default[0].split()[1] == load_registry()["default"], default


def test_entry_point_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`entry()` (what the console script calls) exits with main()'s code: 2 for a user error."""
    out = tmp_path / "x.nii.gz"
    monkeypatch.setattr(sys, "argv", ["medgen", "run", "--task", "segment", "--image",
                                      str(tmp_path / "missing.nii.gz"), "--out", str(out)])
    with pytest.raises(SystemExit) as info:
        cli.entry()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "medgen: error:" in err and "file not found" in err and "Traceback" not in err
    assert not out.exists()


def test_demo(tmp_path: Path, capsys) -> None:
    """`medgen demo --out DIR`: the shipped model on the shipped sample, outputs on its grid."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "segment grey matter: Dice" in printed and "denoise: PSNR" in printed
    names = {"montage.png", "segmentation.nii.gz", "noisy.nii.gz", "denoised.nii.gz", "inpainted.nii.gz"}
    assert names <= set(files_in(out))
    montage = sitk.ReadImage(str(out / "montage.png"))
    assert montage.GetSize()[0] > 500 and montage.GetSize()[1] > 400
    sample = sitk.ReadImage(str(SAMPLE_T1))
    for name in names - {"montage.png"}:
        assert_same_geometry(sitk.ReadImage(str(out / name)), sample)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    tissue = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_TISSUE)))
    assert set(np.unique(seg).tolist()) <= {0, 1, 2}
    n = seg.shape[0]
    for s in (int(n * 0.3), int(n * 0.5), int(n * 0.7)):  # the demo's labelled slices
        np.testing.assert_array_equal(seg[s], tissue[s])
