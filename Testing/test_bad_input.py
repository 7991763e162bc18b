"""Every user mistake ends the same way: exit code != 0, one `medgen: error:` line on stderr that
names the problem, and no output file. Driven through `cli.main([...])` in-process.

Inputs are real: slabs of the MNI152 sample, altered only where the mistake needs it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medgen_helpers import Case, files_in, like, sitk_slab, SAMPLE_T1, SAMPLE_TISSUE
from medgen import cli
from medgen.prompts import pairs_from_volumes
from medgen.io.images import read_volume
from medgen.infer.pipeline import RunOptions, run
from medgen.core.volume import Volume
from medgen.io import weights as W


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def _fails(capsys, argv: list[str], phrase: str, out_dir: Path) -> str:
    """Run the CLI, expect a clean user error containing `phrase`, and nothing written."""
    capsys.readouterr()
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code != 0, f"expected failure, got 0; stderr: {captured.err}"
    assert code == cli.EXIT_USAGE
    err = captured.err
    assert "medgen: error:" in err, err
    assert "Traceback" not in err
    message = err.split("medgen: error:", 1)[1].strip()
    assert phrase.lower() in message.lower(), f"{phrase!r} not in {message!r}"
    assert files_in(out_dir) == [], f"output left behind: {files_in(out_dir)}"
    return message


def _run(case: Case, out: Path, *extra: str, task: str = "segment") -> list[str]:
    return ["run", "--task", task, "--image", str(case.image), "--out", str(out), "--quiet",
            "--device", "cpu", *extra]


def test_context_count_mismatch(capsys, small_case: Case, out_dir: Path) -> None:
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-image", str(small_case.image),
                "--context-image", str(small_case.image), "--context-target", str(small_case.labels))
    msg = _fails(capsys, argv, "2 example images but 1 example targets", out_dir)
    assert "same order" in msg


def test_two_own_targets_without_context_images(capsys, small_case: Case, out_dir: Path) -> None:
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(small_case.labels),
                "--context-target", str(small_case.labels))
    _fails(capsys, argv, "give one example target", out_dir)


def test_context_pair_of_different_shapes(capsys, small_case: Case, tmp_path: Path, out_dir: Path) -> None:
    sitk.WriteImage(sitk_slab(SAMPLE_TISSUE, 35, 43), str(tmp_path / "short_labels.nii.gz"))  # 8 slices
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-image", str(small_case.image),
                "--context-target", str(tmp_path / "short_labels.nii.gz"))
    msg = _fails(capsys, argv, "differ", out_dir)
    assert "(10, 94, 77)" in msg and "(8, 94, 77)" in msg


def test_own_target_of_different_shape(capsys, small_case: Case, tmp_path: Path, out_dir: Path) -> None:
    sitk.WriteImage(sitk_slab(SAMPLE_TISSUE, 35, 43), str(tmp_path / "short_labels.nii.gz"))
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(tmp_path / "short_labels.nii.gz"))
    _fails(capsys, argv, "differs from the image's", out_dir)


@pytest.mark.parametrize("change", ["spacing", "origin"])
def test_synthesis_target_on_another_grid(capsys, small_case: Case, tmp_path: Path, out_dir: Path,
                                          change: str) -> None:
    """A second contrast with the image's shape but not its grid cannot be paired voxel by voxel."""
    second = sitk.ReadImage(str(small_case.image))
    if change == "spacing":
        second.SetSpacing((2.0, 2.0, 2.5))
    else:
        second.SetOrigin(tuple(np.add(second.GetOrigin(), (0.0, 4.0, 0.0))))
    sitk.WriteImage(second, str(tmp_path / "t2_other_grid.nii.gz"))
    argv = _run(small_case, out_dir / "syn.nii.gz", "--context-target", str(tmp_path / "t2_other_grid.nii.gz"),
                task="synthesize")
    msg = _fails(capsys, argv, "on the image's grid", out_dir)
    assert "resample" in msg


def test_synthesis_context_pair_on_two_grids(capsys, small_case: Case, tmp_path: Path, out_dir: Path) -> None:
    second = sitk.ReadImage(str(small_case.image))
    second.SetOrigin(tuple(np.add(second.GetOrigin(), (3.0, 0.0, 0.0))))
    sitk.WriteImage(second, str(tmp_path / "t2_shifted.nii.gz"))
    argv = _run(small_case, out_dir / "syn.nii.gz", "--context-image", str(small_case.image),
                "--context-target", str(tmp_path / "t2_shifted.nii.gz"), task="synthesize")
    _fails(capsys, argv, "different grids", out_dir)


@pytest.mark.parametrize("task", ["segment", "denoise", "synthesize", "inpaint"])
def test_no_examples(capsys, small_case: Case, out_dir: Path, task: str) -> None:
    _fails(capsys, _run(small_case, out_dir / "x.nii.gz", task=task), "no examples", out_dir)


def test_targets_without_any_label(capsys, small_case: Case, tmp_path: Path, out_dir: Path) -> None:
    labels = sitk.ReadImage(str(small_case.labels))
    sitk.WriteImage(like(np.zeros(small_case.truth.shape, np.uint8), labels), str(tmp_path / "empty.nii.gz"))
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(tmp_path / "empty.nii.gz"))
    _fails(capsys, argv, "no labelled slice", out_dir)
    # naming the slices explicitly reaches the engine's own check
    argv += ["--context-slices", "1,8"]
    _fails(capsys, argv, "hold no label at all", out_dir)
    # and the same for examples from another volume
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-image", str(small_case.image),
                "--context-target", str(tmp_path / "empty.nii.gz"), "--context-slices", "2,5")
    _fails(capsys, argv, "hold no label at all", out_dir)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_voxels(capsys, small_case: Case, tmp_path: Path, out_dir: Path, bad: float,
                           suffix: str) -> None:
    image = sitk.ReadImage(str(small_case.image))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[4, 40, 30] = bad
    array[5, 41, 31] = bad
    sitk.WriteImage(like(array, image), str(tmp_path / f"bad{suffix}"))
    argv = ["run", "--task", "segment", "--image", str(tmp_path / f"bad{suffix}"), "--context-target",
            str(small_case.labels), "--out", str(out_dir / "seg.nii.gz"), "--quiet", "--device", "cpu"]
    msg = _fails(capsys, argv, "NaN or Inf", out_dir)
    assert "2 voxels" in msg


def test_non_finite_voxels_in_nifti_never_reach_the_model(small_case: Case, tmp_path: Path) -> None:
    """SimpleITK's NIfTI reader turns NaN/Inf into 0 before the engine sees them (nibabel still
    reads them from the same file): read_volume must either refuse the file or return finite data."""
    from medgen.core.errors import InputError
    image = sitk.ReadImage(str(small_case.image))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[4, 40, 30], array[5, 41, 31] = np.nan, np.inf
    sitk.WriteImage(like(array, image), str(tmp_path / "bad.nii.gz"))
    try:
        volume = read_volume(tmp_path / "bad.nii.gz")
    except InputError as err:
        assert "NaN or Inf" in str(err)
    else:
        assert np.isfinite(volume.array).all()


def test_non_finite_context_target(capsys, small_case: Case, tmp_path: Path, out_dir: Path) -> None:
    image = sitk.ReadImage(str(small_case.image))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[2, 10, 10] = np.nan
    sitk.WriteImage(like(array, image), str(tmp_path / "t2_nan.nrrd"))
    argv = _run(small_case, out_dir / "syn.nii.gz", "--context-target", str(tmp_path / "t2_nan.nrrd"),
                task="synthesize")
    _fails(capsys, argv, "NaN or Inf", out_dir)


def test_four_d_volume(capsys, small_case: Case, tmp_path: Path, out_dir: Path) -> None:
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(small_case.image)))
    four = sitk.GetImageFromArray(np.stack([array, array[::-1]]), isVector=False)
    assert four.GetDimension() == 4
    sitk.WriteImage(four, str(tmp_path / "series.nii.gz"))
    argv = ["run", "--task", "segment", "--image", str(tmp_path / "series.nii.gz"), "--context-target",
            str(small_case.labels), "--out", str(out_dir / "seg.nii.gz"), "--quiet"]
    _fails(capsys, argv, "4D", out_dir)


@pytest.mark.parametrize("suffix", [".nii", ".nrrd"])
def test_complex_pixels(capsys, small_case: Case, tmp_path: Path, out_dir: Path, suffix: str) -> None:
    """A complex-valued image (e.g. raw MR k-space / complex reconstruction) is refused."""
    image = sitk.ReadImage(str(small_case.image))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    complex_image = sitk.GetImageFromArray((array + 1j * array[:, ::-1]).astype(np.complex64))
    complex_image.CopyInformation(image)
    path = tmp_path / f"complex{suffix}"
    sitk.WriteImage(complex_image, str(path))
    assert "complex" in sitk.ReadImage(str(path)).GetPixelIDTypeAsString()
    argv = ["run", "--task", "denoise", "--image", str(path), "--context-target", str(small_case.image),
            "--out", str(out_dir / "den.nii.gz"), "--quiet"]
    _fails(capsys, argv, "pixel type complex64 is not supported", out_dir)


def _usage_fails(capsys, argv: list[str], phrase: str, out_dir: Path) -> None:
    """Refused by the option's argparse type, before any file is read: exit 2, one line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == cli.EXIT_USAGE
    assert len(err.strip().splitlines()) == 1 and phrase in err, err
    assert files_in(out_dir) == []


# the axis is checked by its argparse type since issue 10 (was: by the engine, after reading)
def test_axis_out_of_range(capsys, small_case: Case, out_dir: Path) -> None:
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(small_case.labels), "--axis", "5")
    _usage_fails(capsys, argv, "axis 5 is out of range", out_dir)


def test_unknown_axis_name(capsys, small_case: Case, out_dir: Path) -> None:
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(small_case.labels), "--axis", "oblique")
    _usage_fails(capsys, argv, "unknown axis", out_dir)


def test_slice_index_out_of_range(capsys, small_case: Case, out_dir: Path) -> None:
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(small_case.labels),
                "--context-slices", "999")
    _fails(capsys, argv, "slice index 999 is out of range", out_dir)
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-image", str(small_case.image),
                "--context-target", str(small_case.labels), "--context-slices", "2,999")
    _fails(capsys, argv, "slice index 999 is out of range", out_dir)


def test_unparsable_slices(capsys, small_case: Case, out_dir: Path) -> None:
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(small_case.labels),
                "--context-slices", "one,two")
    _fails(capsys, argv, "comma-separated slice indices", out_dir)


def test_missing_weights(capsys, small_case: Case, out_dir: Path) -> None:
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(small_case.labels),
                "--context-slices", "1,8", "--model", "/nonexistent/path")
    _fails(capsys, argv, "does not exist", out_dir)


def test_unknown_model_id(capsys, small_case: Case, out_dir: Path) -> None:
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(small_case.labels),
                "--context-slices", "1,8", "--model", "medgen-nonexistent")
    _fails(capsys, argv, "unknown model", out_dir)


def test_corrupt_weights(capsys, small_case: Case, tmp_path: Path, out_dir: Path) -> None:
    ckpt = tmp_path / "broken_ckpt"
    ckpt.mkdir()
    shutil.copy(W.RESOURCES / "Models" / "medgen-small" / "config.json", ckpt / "config.json")
    rng = np.random.default_rng(0)
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + rng.bytes(2048))
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(small_case.labels),
                "--context-slices", "1,8", "--model", str(ckpt))
    _fails(capsys, argv, "corrupt or truncated", out_dir)


def test_truncated_registry_weights_fail_checksum(capsys, small_case: Case, tmp_path: Path, out_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry model whose file was cut short is refused by its sha256, before loading."""
    src = W.RESOURCES
    res = tmp_path / "Resources"
    res.mkdir()
    for name in ("Models.json", "Models.schema.json"):
        shutil.copy(src / name, res / name)
    shutil.copytree(src / "Models", res / "Models")
    weights = res / "Models" / W.load_registry()["default"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    monkeypatch.setattr(W, "RESOURCES", res)
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(small_case.labels),
                "--context-slices", "1,8")
    _fails(capsys, argv, "checksum mismatch", out_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_on_a_cpu_machine(capsys, small_case: Case, out_dir: Path) -> None:
    argv = ["run", "--task", "segment", "--image", str(small_case.image), "--context-target",
            str(small_case.labels), "--out", str(out_dir / "seg.nii.gz"), "--quiet", "--device", "cuda"]
    _fails(capsys, argv, "CUDA device was asked for", out_dir)


def test_unknown_device(capsys, small_case: Case, out_dir: Path) -> None:
    argv = ["run", "--task", "segment", "--image", str(small_case.image), "--context-target",
            str(small_case.labels), "--out", str(out_dir / "seg.nii.gz"), "--quiet", "--device", "tpu"]
    _fails(capsys, argv, "unknown device", out_dir)


def test_bad_output_path(capsys, small_case: Case, out_dir: Path) -> None:
    base = _run(small_case, out_dir / "seg.xyz", "--context-target", str(small_case.labels))
    _fails(capsys, base, "unsupported output extension", out_dir)
    missing = _run(small_case, out_dir / "no" / "such" / "seg.nii.gz", "--context-target", str(small_case.labels))
    _fails(capsys, missing, "does not exist", out_dir)


def test_missing_image(capsys, small_case: Case, out_dir: Path, tmp_path: Path) -> None:
    argv = ["run", "--task", "segment", "--image", str(tmp_path / "nope.nii.gz"), "--context-target",
            str(small_case.labels), "--out", str(out_dir / "seg.nii.gz"), "--quiet"]
    _fails(capsys, argv, "file not found", out_dir)


def test_unreadable_image(capsys, small_case: Case, out_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "garbage.nii.gz").write_bytes(b"this is not a NIfTI file")
    argv = ["run", "--task", "segment", "--image", str(tmp_path / "garbage.nii.gz"), "--context-target",
            str(small_case.labels), "--out", str(out_dir / "seg.nii.gz"), "--quiet"]
    _fails(capsys, argv, "cannot read image", out_dir)


def test_inpaint_mask_problems(capsys, small_case: Case, tmp_path: Path, out_dir: Path) -> None:
    labels = sitk.ReadImage(str(small_case.labels))
    sitk.WriteImage(like(np.zeros(small_case.truth.shape, np.uint8), labels), str(tmp_path / "empty_mask.nii.gz"))
    argv = _run(small_case, out_dir / "fill.nii.gz", "--mask", str(tmp_path / "empty_mask.nii.gz"), task="inpaint")
    _fails(capsys, argv, "mask is empty", out_dir)
    sitk.WriteImage(sitk_slab(SAMPLE_TISSUE, 35, 40), str(tmp_path / "short_mask.nii.gz"))
    argv = _run(small_case, out_dir / "fill.nii.gz", "--mask", str(tmp_path / "short_mask.nii.gz"), task="inpaint")
    _fails(capsys, argv, "mask with the image's shape", out_dir)


def test_models_download_needs_an_id(capsys) -> None:
    # `models verify` without an id verifies every registry model since issue 10
    capsys.readouterr()
    assert cli.main(["models", "download"]) == cli.EXIT_USAGE
    assert "needs a model id" in capsys.readouterr().err


def test_argparse_rejects_unknown_task(capsys, small_case: Case, out_dir: Path) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--task", "colourise", "--image", str(small_case.image), "--out", str(out_dir / "x.nii.gz")])
    assert info.value.code != 0
    assert "invalid choice" in capsys.readouterr().err
    assert files_in(out_dir) == []


# -- cancellation -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slab():
    t1, tissue = read_volume(SAMPLE_T1), read_volume(SAMPLE_TISSUE, label=True)
    image = Volume(np.ascontiguousarray(t1.array[36:44]), t1.spacing, t1.origin, t1.direction)
    return image, image.with_array(np.ascontiguousarray(tissue.array[36:44]))


def test_cancelled_run_returns_none(model, slab) -> None:
    image, labels = slab
    examples = pairs_from_volumes(image, labels, 0, [0, 7], "segment", "mr", own=True)
    assert run(model, image, examples, RunOptions("segment", 0, "mr", "cpu"), cancel=lambda: True) is None
    denoise = pairs_from_volumes(image, image, 0, [2], "denoise", "mr", own=False)
    assert run(model, image, denoise, RunOptions("denoise", 0, "mr", "cpu"), cancel=lambda: True) is None


@pytest.mark.parametrize("mode, cancel_at", [("propagate", 4), ("independent", 2)])
def test_cancel_in_the_middle(model, slab, mode: str, cancel_at: int) -> None:
    """Cancelling after a few model calls (mid-propagation) also returns None, not a partial result."""
    from medgen.infer.segment import SegmentSettings
    image, labels = slab
    examples = pairs_from_volumes(image, labels, 0, [0, 7], "segment", "mr", own=True)
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) >= cancel_at  # propagate: after step 1; independent: after encoding

    options = RunOptions("segment", 0, "mr", "cpu", segment=SegmentSettings(mode=mode))
    assert run(model, image, examples, options, cancel=cancel) is None
    assert len(calls) == cancel_at


# -- regressions: engine bugs found by these tests and fixed ------------------------------------
@pytest.mark.model
def test_labels_above_uint16_are_kept(small_case: Case, tmp_path: Path) -> None:
    labels = sitk.ReadImage(str(small_case.labels))
    big = np.where(small_case.truth == 3, 1000, np.where(small_case.truth == 7, 70000, 0)).astype(np.int32)
    sitk.WriteImage(like(big, labels), str(tmp_path / "big.nrrd"))
    out = tmp_path / "seg.nrrd"
    code = cli.main(["run", "--task", "segment", "--image", str(small_case.image), "--context-target",
                     str(tmp_path / "big.nrrd"), "--context-slices", "1,8", "--out", str(out), "--quiet",
                     "--device", "cpu"])
    assert code == 0
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    np.testing.assert_array_equal(result[[1, 8]], big[[1, 8]])


def test_own_labels_on_another_grid_are_refused(capsys, small_case: Case, tmp_path: Path, out_dir: Path) -> None:
    labels = sitk.ReadImage(str(small_case.labels))
    labels.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    labels.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(labels, str(tmp_path / "flipped_labels.nii.gz"))
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(tmp_path / "flipped_labels.nii.gz"),
                "--context-slices", "1,8")
    _fails(capsys, argv, "grid", out_dir)


def test_fractional_label_targets_are_refused(capsys, small_case: Case, tmp_path: Path, out_dir: Path) -> None:
    labels = sitk.ReadImage(str(small_case.labels))
    soft = ((small_case.truth > 0) * 0.7).astype(np.float32)
    sitk.WriteImage(like(soft, labels), str(tmp_path / "soft.nrrd"))
    argv = _run(small_case, out_dir / "seg.nii.gz", "--context-target", str(tmp_path / "soft.nrrd"),
                "--context-slices", "1,8")
    _fails(capsys, argv, "label", out_dir)
