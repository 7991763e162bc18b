"""The self-check (medgen/infer/selfcheck.py): leave-one-out on the user's own examples picks the
method per label or task and reports its estimate.

Real data: the pyradiomics lung2 CT (../shared/data, held out from training), cut to a 128 x 128
box around the lesion, all 61 slices (5 mm). The constructed case puts a cone on that CT: a disk
whose radius grows by one pixel per slice, a shape fill between slices (ITK's contour
interpolation) reproduces between labelled slices while copying, registration (which follows the
lung's tissue, not the cone) and a model that never saw cones do not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medgen.core.errors import InputError
from medgen.core.intensity import fit_normalizer
from medgen.core.volume import Volume, parse_axis
from medgen.infer import classical, segment, selfcheck
from medgen.infer.interpolate import fill_between_slices
from medgen.infer.pipeline import RunOptions, run, run_with_report
from medgen.infer.segment import SegmentSettings
from medgen.io.images import read_volume, write_volume
from medgen.prompts import pairs_from_volumes

CONE = (20, 41)  # slices the cone spans (numpy axis 0 = axial here)
CONE_GIVEN = [20, 25, 30, 35, 40]


@pytest.fixture(scope="module")
def lung(shared_data: Path) -> tuple[Volume, Volume]:
    image = read_volume(shared_data / "pyradiomics" / "lung2_image.nrrd")
    label = read_volume(shared_data / "pyradiomics" / "lung2_label.nrrd", label=True)
    assert parse_axis("axial", image) == 0
    rows, cols = np.nonzero(label.array.any(0))
    r, c = int(rows.mean()), int(cols.mean())
    box = (slice(None), slice(r - 64, r + 64), slice(c - 64, c + 64))
    crop = lambda v: Volume(np.ascontiguousarray(v.array[box]), v.spacing, v.origin, v.direction)
    return crop(image), crop(label)


def _cone(shape: tuple[int, int, int]) -> np.ndarray:
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    out = np.zeros(shape, np.uint8)
    for s in range(*CONE):
        out[s] = np.hypot(yy - 64, xx - 64) <= 4 + (s - CONE[0])
    return out


def test_choice_follows_the_method_that_is_clearly_better(model, lung) -> None:
    """Between the labelled slices of a cone, fill between slices is right and the others are
    not: the self-check must see that on the hidden slices, pick it, and the output must be it."""
    image, _ = lung
    cone = _cone(image.shape)
    given_only = np.zeros_like(cone)
    given_only[CONE_GIVEN] = cone[CONE_GIVEN]
    examples = pairs_from_volumes(image, image.with_array(given_only), 0, CONE_GIVEN, "segment", "ct", own=True)
    result = run_with_report(model, image, examples, RunOptions("segment", 0, "ct", "cpu"))
    (est,) = result.report.estimates
    assert est.parts["between"] == "fill", est
    assert est.folds == len(CONE_GIVEN) and est.examples == len(CONE_GIVEN)
    fill = fill_between_slices(given_only > 0, CONE_GIVEN)
    inner = slice(CONE_GIVEN[0] + 1, CONE_GIVEN[-1])
    np.testing.assert_array_equal(result.volume.array[inner] > 0, fill[inner])
    truth = cone[inner] > 0
    assert 2 * np.sum(fill[inner] & truth) / (fill[inner].sum() + truth.sum()) > 0.9
    line = result.report.lines()[0]
    assert line.startswith("label 1: fill between") and "estimated Dice" in line and "from 5 labelled slices" in line


def test_one_labelled_slice_says_it_cannot_estimate(model, lung) -> None:
    image, label = lung
    given = [20]
    examples = pairs_from_volumes(image, label, 0, given, "segment", "ct", own=True)
    result = run_with_report(model, image, examples, RunOptions("segment", 0, "ct", "cpu"))
    (est,) = result.report.estimates
    assert est.estimate is None and est.candidates == {} and est.folds == 0
    assert est.chosen == "model" and "nothing to hold out" in est.note
    assert "no estimate from 1 labelled slice" in result.report.lines()[0]
    assert result.report.lines()[0].endswith("label a second slice of it for an estimate and a choice of method)")
    forced = run(model, image, examples, RunOptions("segment", 0, "ct", "cpu", method="model"))
    np.testing.assert_array_equal(result.volume.array, forced.array)  # the rule's choice, exactly


def test_denoising_with_one_pair_ranks_the_tuned_classical_methods_on_it(model, lung) -> None:
    """One pair: nothing to hold out, no estimate; NL-means and TV, each tuned on the pair, are
    ranked by how well they fit it, and the run is the better one's (the model stays out)."""
    image, _ = lung
    rng = np.random.default_rng(0)
    noisy = image.with_array((image.array + rng.normal(0, 40, image.shape)).astype(np.float32))
    examples = pairs_from_volumes(noisy, image, 0, [30], "denoise", "ct", own=False)
    query = Volume(noisy.array[34:36], noisy.spacing, noisy.origin, noisy.direction)
    result = run_with_report(model, query, examples, RunOptions("denoise", 0, "ct", "cpu"))
    (est,) = result.report.estimates
    assert est.estimate is None and est.candidates == {} and "nothing to hold out" in est.note
    assert "; give a second example pair for an estimate and a choice of method" in est.note
    fit = selfcheck.fit_scores("denoise", examples, {m: selfcheck.classical_method("denoise", m, examples)
                                                     for m in ("nl-means", "tv")})
    assert est.chosen == max(fit, key=fit.get) and f"{est.chosen} {fit[est.chosen]:.2f} dB" in est.note
    forced = run(model, query, examples, RunOptions("denoise", 0, "ct", "cpu", method=est.chosen))
    np.testing.assert_array_equal(result.volume.array, forced.array)
    clean = image.array[34:36].astype(np.float32)
    assert np.abs(result.volume.array - clean).mean() < np.abs(query.array - clean).mean()


def test_unknown_method_is_refused_before_any_work(model, lung) -> None:
    image, label = lung
    examples = pairs_from_volumes(image, label, 0, [18, 22], "segment", "ct", own=True)
    with pytest.raises(InputError, match="unknown method 'nl-means' for segment"):
        run(model, image, examples, RunOptions("segment", 0, "ct", "cpu", method="nl-means"))


def _records(scores: dict[tuple[str, str, int], float]) -> list:
    """Fold records whose pooled Dice is the given score (100 truth pixels a hidden slice)."""
    return [(1, region, m, np.array([100 * d, 100.0, 100.0]), h) for (region, m, h), d in scores.items()]


def test_one_interior_fold_does_not_choose_between_alone() -> None:
    """k = 3: the hidden middle slice alone favours the model between, the two outer folds favour
    registration by far; one method does the whole run, the best on all folds (registration). With
    two interior folds saying the same, the between job gets its own method."""
    scores = {}
    for m, (mid, ends) in {"model": (0.47, 0.0), "registration": (0.17, 0.82), "nearest": (0.0, 0.0),
                           "fill": (0.0, 0.0)}.items():
        scores.update({("between", m, 88): mid, ("beyond", m, 73): ends, ("beyond", m, 101): ends})
    own = {s: np.ones((2, 2), np.uint8) for s in (73, 88, 101)}
    (est,) = selfcheck.choose_segmentation(_records(scores), [1], own)
    assert est.parts == {"between": "registration", "beyond": "registration"}, est
    assert "one interior labelled slice" in est.note
    scores.update({("between", m, 95): d for (r, m, h), d in list(scores.items()) if h == 88})
    (est,) = selfcheck.choose_segmentation(_records(scores), [1], {**own, 95: own[88]})
    assert est.parts == {"between": "model", "beyond": "registration"}, est


def test_a_tie_within_the_margin_goes_to_the_model() -> None:
    own = {s: np.ones((2, 2), np.uint8) for s in (10, 20)}
    close = {("beyond", "model", 10): 0.890, ("beyond", "registration", 10): 0.891,
             ("beyond", "nearest", 10): 0.5}
    (est,) = selfcheck.choose_segmentation(_records(close), [1], own)
    assert est.chosen == "model"
    clear = {**close, ("beyond", "registration", 10): 0.890 + 2 * selfcheck.MODEL_MARGIN}
    (est,) = selfcheck.choose_segmentation(_records(clear), [1], own)
    assert est.chosen == "registration"
    (est,) = selfcheck.choose_segmentation(_records(close), [1], own, margin=0.0)  # the margin sweep's
    assert est.chosen == "registration"


def test_two_labelled_slices_choose_between_the_carrying_methods() -> None:
    """k = 2: each fold carries one labelled slice across the whole gap to the other, where nearest
    copy only measures how alike the two slices are: the choice is the model or registration, even
    when nearest scores higher; with an interior fold nearest competes again."""
    own = {s: np.ones((2, 2), np.uint8) for s in (10, 20)}
    scores = {("beyond", "model", 10): 0.3, ("beyond", "registration", 10): 0.6, ("beyond", "nearest", 10): 0.8,
              ("beyond", "model", 20): 0.3, ("beyond", "registration", 20): 0.6, ("beyond", "nearest", 20): 0.8}
    (est,) = selfcheck.choose_segmentation(_records(scores), [1], own)
    assert est.chosen == "registration" and est.candidates["nearest"] == 0.8 and "model or registration" in est.note
    scores.update({("between", m, 15): d for (r, m, h), d in list(scores.items()) if h == 10})
    (est,) = selfcheck.choose_segmentation(_records(scores), [1], {**own, 15: own[10]})
    assert est.chosen == "nearest"


def test_folds_hide_both_ends_and_spread_inside() -> None:
    assert selfcheck.fold_slices([3, 9]) == [3, 9]
    folds = selfcheck.fold_slices(list(range(0, 40, 2)))
    assert folds[0] == 0 and folds[-1] == 38 and len(folds) == selfcheck.MAX_FOLDS
    assert folds == sorted(set(folds))


# -- the command line: forcing a method, the printed lines and the JSON sidecar -------------------------
def _medgen(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-m", "medgen", *argv], capture_output=True, text=True,
                          timeout=900, env=env)


@pytest.fixture(scope="module")
def lung_files(lung, tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("lung2")
    image, label = lung
    write_volume(image, folder / "image.nii.gz")
    write_volume(label, folder / "label.nii.gz")
    return folder, folder / "image.nii.gz", folder / "label.nii.gz"


REPORT_KEYS = {"schema": int, "task": str, "method": str, "estimates": list, "check_seconds": float,
               "run_seconds": float}
ESTIMATE_KEYS = {"name": str, "metric": str, "chosen": str, "estimate": (float, type(None)),
                 "candidates": dict, "examples": int, "folds": int, "parts": dict, "note": str,
                 "leave_one_out": (float, type(None))}


@pytest.mark.model
def test_forced_method_and_report_sidecar(lung_files) -> None:
    """`--method registration` gives exactly SimpleITK's demons propagation with the runtime's
    stop rules on its open ends; the sidecar says so."""
    folder, image_path, label_path = lung_files
    out, report = folder / "forced.nii.gz", folder / "forced.json"
    done = _medgen("run", "--task", "segment", "--image", str(image_path), "--context-target",
                   str(label_path), "--context-slices", "17,23", "--method", "registration",
                   "--report", str(report), "--out", str(out), "--device", "cpu", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "label 1: registration, no estimate from 2 labelled slices" in done.stdout
    data = json.loads(report.read_text())
    assert data["method"] == "registration" and data["estimates"][0]["chosen"] == "registration"
    image, label = read_volume(image_path), read_volume(label_path, label=True).array
    given = {s: label[s] > 0 for s in (17, 23)}
    normed = fit_normalizer(image.array, "ct", clip=True)(image.array)
    geometry = (image.slice_spacing(0), image.slice_thickness(0), SegmentSettings().extent)
    expected = selfcheck.cap_open_ends(classical.registration_propagate(
        normed, given, image.slice_spacing(0), reach=max(segment.end_reaches(given, *geometry)),
        tissue_stop=True, max_side=selfcheck.REG_MAX_SIDE, iterations=selfcheck.REG_ITERATIONS,
        refine=selfcheck.REG_REFINE), given, *geometry)
    np.testing.assert_array_equal(read_volume(out, label=True).array > 0, expected)
    # plain demons (the bench's baseline, as a user would run it) carries the lesion to the
    # volume's edges; the runtime's open ends stop within the reach of the lesion's radius
    plain = classical.registration_propagate(normed, given, image.slice_spacing(0))
    assert plain[0].any() and plain[-1].any()
    low, high = segment.end_reaches(given, *geometry)
    present = np.nonzero(expected.any((1, 2)))[0]
    assert present[0] >= 17 - low and present[-1] <= 23 + high < label.shape[0] - 1


@pytest.mark.model
def test_auto_prints_estimates_and_writes_the_schema(lung_files) -> None:
    folder, image_path, label_path = lung_files
    out, report = folder / "auto.nii.gz", folder / "auto.json"
    done = _medgen("run", "--task", "segment", "--image", str(image_path), "--context-target",
                   str(label_path), "--context-slices", "16,20,24", "--report", str(report),
                   "--out", str(out), "--device", "cpu", "--quiet")
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    for key, kind in REPORT_KEYS.items():
        assert isinstance(data[key], kind), key
    assert data["schema"] == selfcheck.SCHEMA_VERSION and data["task"] == "segment" and data["method"] == "auto"
    (est,) = data["estimates"]
    for key, kind in ESTIMATE_KEYS.items():
        assert isinstance(est[key], kind), key
    assert est["name"] == "label 1" and est["metric"] == "dice" and est["examples"] == 3 and est["folds"] == 3
    assert set(est["candidates"]) == set(selfcheck.SEGMENT_METHODS)
    assert all(0.0 <= v <= 1.0 for v in est["candidates"].values()) and 0.0 <= est["estimate"] <= 1.0
    assert set(est["parts"]) == {"between", "beyond"} and set(est["parts"].values()) <= set(selfcheck.SEGMENT_METHODS)
    # the estimate is the chosen method's leave-one-out Dice mapped to the Dice the run should get
    loo = est["leave_one_out"]
    assert loo == est["candidates"][est["chosen"]] or " between, " in est["chosen"]
    assert est["estimate"] == pytest.approx(selfcheck.expected_dice(loo), abs=1e-4)
    line = next(l for l in done.stdout.splitlines() if l.startswith("label 1:"))
    assert f"estimated Dice {est['estimate']:.2f}" in line and "from 3 labelled slices" in line
    assert f"leave-one-out {loo:.2f}" in line
    for m, v in est["candidates"].items():
        if m != est["chosen"]:
            assert f"{m} {v:.2f}" in line


@pytest.mark.model
def test_bad_method_and_report_path_exit_2_and_write_nothing(lung_files) -> None:
    folder, image_path, label_path = lung_files
    out = folder / "never.nii.gz"
    base = ["run", "--task", "segment", "--image", str(image_path), "--context-target", str(label_path),
            "--context-slices", "17,23", "--out", str(out), "--device", "cpu", "--quiet"]
    bad = _medgen(*base, "--method", "biharmonic")
    assert bad.returncode == 2 and "unknown method 'biharmonic' for segment" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    wrong = _medgen(*base, "--report", str(folder / "report.txt"))
    assert wrong.returncode == 2 and "give a path ending in .json" in wrong.stderr
    assert not out.exists() and not (folder / "report.txt").exists()


def test_registration_stopped_at_the_hidden_slice_gives_the_same_answer_there(shared_data: Path) -> None:
    """The self-check's folds only need the hidden slice: chains stop there (half the demons
    registrations between two labelled slices), and the answer at that slice is unchanged."""
    from medgen.core.intensity import fit_normalizer
    from medgen.infer.classical import registration_propagate
    from medgen.io.images import read_volume

    image = read_volume(shared_data / "pyradiomics" / "lung2_image.nrrd")
    label = read_volume(shared_data / "pyradiomics" / "lung2_label.nrrd", label=True).array[12:28] > 0
    slices = fit_normalizer(image.array, "ct", clip=True)(image.array[12:28].astype(np.float32))
    given = {4: label[4], 12: label[12]}
    for hidden in (5, 8, 11, 14, 1):  # between the two, and beyond each end
        full = registration_propagate(slices, given, image.slice_spacing(0))[hidden]
        stopped = registration_propagate(slices, given, image.slice_spacing(0), stop_at=hidden)[hidden]
        np.testing.assert_array_equal(full, stopped)
        assert full.any()


def _image_case(image: Volume, task: str) -> tuple[list, Volume, Volume | None, np.ndarray]:
    """Four example pairs and two query slices of the lung CT: with noise (denoise) or a hole (inpaint)."""
    from medgen.prompts import inpaint_self_examples

    clean = image.array.astype(np.float32)
    if task == "denoise":
        noisy = image.with_array(clean + np.random.default_rng(0).normal(0, 40, image.shape).astype(np.float32))
        examples = pairs_from_volumes(noisy, image, 0, [22, 28, 38, 44], "denoise", "ct", own=False)
        return examples, _slab(noisy.array[32:34], image), None, clean[32:34]
    hole = np.zeros(image.shape, np.uint8)
    hole[32:34, 50:70, 40:64] = 1
    holed = image.with_array(np.where(hole > 0, 0, clean))
    examples = inpaint_self_examples(holed, image.with_array(hole), 0, "ct", count=4)
    return examples, _slab(holed.array[32:34], image), _slab(hole[32:34], image), clean[32:34]


def _slab(array: np.ndarray, like: Volume) -> Volume:
    return Volume(np.ascontiguousarray(array), like.spacing, like.origin, like.direction)


@pytest.mark.parametrize("task", ["denoise", "inpaint"])
def test_the_examples_decide_how_much_correction_to_keep(model, lung, task, monkeypatch) -> None:
    """A network whose correction is noise (the image head's weights scrambled) must be held to its
    classical start by the strength the examples give; kept whole, the same correction is far worse."""
    import copy

    import torch

    from medgen.infer import imagetasks
    from medgen.metrics import psnr

    image, _ = lung
    examples, query, mask, clean = _image_case(image, task)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        noise = torch.randn(broken.image_head.weight.shape, generator=torch.Generator().manual_seed(0))
        broken.image_head.weight.add_(noise * 0.5)  # seeded: the scramble is the same whatever ran before
    options = RunOptions(task, 0, "ct", "cpu", method="model")
    region = mask.array > 0 if mask is not None else np.ones(clean.shape, bool)
    score = lambda out: psnr(out.volume.array[region], clean[region], float(np.ptp(clean[region])))
    fitted = run_with_report(broken, query, examples, options, mask=mask)
    assert "the model kept 0% of its correction" in fitted.report.lines()[0] or \
        "the model kept 1% of its correction" in fitted.report.lines()[0], fitted.report.lines()
    fixed = {}
    for strength in (0.0, 1.0):
        monkeypatch.setattr(imagetasks, "correction_strength", lambda *a, s=strength: s)
        fixed[strength] = score(run_with_report(broken, query, examples, options, mask=mask))
    assert score(fitted) >= fixed[0.0] - 0.2 and fixed[1.0] < fixed[0.0] - 3, (score(fitted), fixed)


def test_one_pair_keeps_the_whole_correction(model, lung) -> None:
    """Nothing to hold out with one pair: the model's output is its own, and no share is reported."""
    from medgen.infer import imagetasks
    from medgen.infer.predictor import Predictor

    image, _ = lung
    examples, query, _, _ = _image_case(image, "denoise")
    assert imagetasks.correction_strength(Predictor(model, "cpu"), examples[:1], 1, 0) is None
    one = run_with_report(model, query, examples[:1], RunOptions("denoise", 0, "ct", "cpu", method="model"))
    assert "kept" not in one.report.lines()[0]


def test_expected_dice_is_monotone_and_bounded() -> None:
    """The map from leave-one-out to expected Dice keeps the order of the candidates' scores and
    stays a Dice; a perfect leave-one-out does not promise more than the fitted runs got."""
    loo = np.linspace(0, 1, 101)
    expected = np.array([selfcheck.expected_dice(v) for v in loo])
    assert np.all(np.diff(expected) > 0) and expected.min() >= 0 and expected.max() <= 1
    assert expected[0] > 0.3 and expected[-1] < 1  # pessimistic raw scores are lifted, not inflated to 1


def test_inpainting_examples_hold_tissue_under_the_hole(shared_data: Path) -> None:
    """The examples made from the user's hole put it on intact slices that hold tissue there: on the
    bench's brain MR the intact slices run out to the top and bottom of the head, where the hole falls
    on air (a fold the model fails and biharmonic trivially passes, which once decided the run)."""
    from medgen.prompts import TISSUE_LEVEL, inpaint_self_examples
    from medgen_dev.bench.data import mask_on_image

    brats = shared_data / "brats"
    image = read_volume(brats / "BraTS-MET-AURORA-example" / "t1.nii.gz")
    hole = mask_on_image(brats / "BraTS-GLI-00001-000" / "inpainting_mask.nii.gz",
                         brats / "BraTS-MET-AURORA-example" / "t1.nii.gz")
    axis = parse_axis("axial", image)
    holed = image.with_array(np.where(hole, 0, image.array).astype(np.float32))
    examples = inpaint_self_examples(holed, image.with_array(hole.astype(np.uint8)), axis, "mr")
    norm = fit_normalizer(image.array, "mr")
    slices = np.moveaxis(image.array, axis, 0)
    holes = np.moveaxis(hole, axis, 0)
    with_hole = np.nonzero(holes.any((1, 2)))[0]
    plane = holes[with_hole[len(with_hole) // 2]]  # the hole the examples carry
    share = [float(np.mean(norm(s[plane]) > TISSUE_LEVEL)) for s in slices]
    intact = [i for i in range(len(slices)) if not holes[i].any() and slices[i].std() > 0]
    assert min(share[i] for i in (intact[0], intact[-1])) < 0.5 * max(share)  # the ends are air there
    assert len(examples) == 6
    for e in examples:
        np.testing.assert_array_equal(e.image, np.where(plane, 0, e.target))
        assert np.mean(norm(e.target[plane]) > TISSUE_LEVEL) >= 0.5 * max(share[i] for i in intact)


def test_inpainting_examples_of_a_2d_image_put_the_hole_on_tissue(shared_data: Path) -> None:
    """On a 2D image the hole is moved about the image: onto the fundus, not the black around it."""
    from medgen.prompts import TISSUE_LEVEL, inpaint_self_examples

    image = read_volume(shared_data / "drive" / "images" / "21.png")
    assert image.is_2d
    hole = np.zeros(image.shape, np.uint8)
    r, c = (s // 2 for s in image.shape[-2:])
    hole[..., r - 20:r + 20, c - 20:c + 20] = 1
    examples = inpaint_self_examples(image, image.with_array(hole), 0, "other")
    assert len(examples) == 6
    norm = fit_normalizer(image.array, "other")
    for e in examples:
        moved = e.image != e.target
        assert moved.sum() > 0.9 * hole.sum()  # the fundus is under the hole: nearly no pixel is 0
        assert np.mean(norm(e.target[e.image != e.target]) > TISSUE_LEVEL) > 0.9


@pytest.fixture(scope="module")
def tcga_denoise(shared_data: Path) -> tuple[list, Volume, np.ndarray]:
    """The bench's denoising setup on TCGA-DU-7294 T1 (Rician noise, 5 % of the range): four
    example pairs and two query slices (slices-first), with the clean slices. Its background rings
    below zero around a zero background, as resampled MR often does."""
    from medgen_dev.bench.data import add_noise

    image = read_volume(shared_data / "brats" / "TCGA-DU-7294" / "t1.nii.gz")
    axis = parse_axis("axial", image)
    clean = np.moveaxis(image.array.astype(np.float32), axis, 0)
    noisy = add_noise(clean, "mr", 0.05, fit_normalizer(image.array, "mr"), np.random.default_rng(0))
    stack = lambda a: Volume(np.ascontiguousarray(a), image.spacing, image.origin, image.direction)
    examples = pairs_from_volumes(stack(noisy), stack(clean), 0, [18, 56, 93, 131], "denoise", "mr", own=False)
    return examples, stack(noisy[[47, 84]]), clean[[47, 84]]


def test_image_folds_are_scored_on_tissue_not_a_ringing_background(tcga_denoise) -> None:
    """A fold is scored where the hidden target holds tissue: not everything above its minimum,
    which on this volume (ringing down to -29 around a zero background) is the whole slice."""
    examples, _, _ = tcga_denoise
    for e in examples[1:3]:
        assert e.target.min() < -10 and np.mean(e.target > e.target.min()) > 0.99  # the premise
        region, brain = selfcheck._tissue(e, "denoise"), e.target > 0
        assert region.mean() < 0.5 * np.mean(e.target > e.target.min())
        assert np.sum(region & brain) / np.sum(region | brain) > 0.8


def test_denoising_auto_follows_the_classical_method_that_wins_on_tissue(model, tcga_denoise) -> None:
    """Where NL-means beats the model on the brain, auto must say so and run it (scored on the whole
    slice, the model's flat background once put it 4 dB ahead on the folds)."""
    from medgen.metrics import psnr

    examples, query, clean = tcga_denoise
    brain = clean > 0
    score = lambda a: psnr(a[brain], clean[brain], float(np.ptp(clean[brain])))
    forced = {m: score(run(model, query, examples, RunOptions("denoise", 0, "mr", "cpu", method=m)).array)
              for m in ("model", "nl-means")}
    assert forced["nl-means"] > forced["model"] + 0.3, forced  # the premise: the bench's figures
    auto = run_with_report(model, query, examples, RunOptions("denoise", 0, "mr", "cpu"))
    (est,) = auto.report.estimates
    assert est.chosen in ("nl-means", "tv"), est
    assert est.candidates[est.chosen] > est.candidates["model"] + selfcheck.IMAGE_MARGIN


def test_a_classical_lead_within_the_image_margin_goes_to_the_model() -> None:
    """A classical method replaces the model only when ahead on the folds by more than IMAGE_MARGIN dB."""
    m = selfcheck.IMAGE_MARGIN
    close = {"model": [30.0, 31.0], "nl-means": [30.0 + m / 2, 31.0 + m / 2], "tv": [29.0, 30.0]}
    clear = {"model": [30.0, 31.0], "nl-means": [30.0 + 2 * m, 31.0 + 2 * m], "tv": [29.0, 30.0]}
    assert selfcheck.choose_image_task("denoise", close, 3).chosen == "model"
    assert selfcheck.choose_image_task("denoise", clear, 3).chosen == "nl-means"
    assert selfcheck.choose_image_task("denoise", close, 3, margin=0.0).chosen == "nl-means"
