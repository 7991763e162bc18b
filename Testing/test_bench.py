"""`medgen bench`: the quick run produces a complete, finite report (the CI requirement of the
benchmark issue), and the baselines behave as the tools they stand for, on real data.

Real images only: the pyradiomics lung2 CT and its lesion ROI, BUSI ultrasound, the BraTS AURORA
T1 and the shipped MNI152 sample. The quick run uses the shipped configuration's quick subset.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from medgen_helpers import SAMPLE_T1, SAMPLE_TISSUE, dice, sitk_slab

from medgen_dev.bench import runner as bench

from medgen_dev.bench import baselines as bl

from medgen_dev.bench import data as bench_data
from medgen_dev.bench import report as bench_report
from medgen_dev.bench.speed import universeg_flops, universeg_reference
from medgen.io.images import read_volume
from medgen.metrics import seg_scores
from medgen.core.intensity import fit_normalizer
from medgen.nn.model import InContextUNet, count_parameters


def _finite_leaves(node, path: str = "") -> list[str]:
    """Paths of every number in a JSON tree that is not finite (empty when all are)."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _finite_leaves(v, f"{path}/{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _finite_leaves(v, f"{path}[{i}]")]
    if isinstance(node, float) and not math.isfinite(node):
        return [path]
    return []


def _metric_count(node) -> int:
    if isinstance(node, dict):
        return sum(_metric_count(v) for v in node.values()) + sum(
            1 for k, v in node.items() if k in ("dice", "hd95", "psnr", "ssim", "seconds") and isinstance(v, float))
    if isinstance(node, list):
        return sum(_metric_count(v) for v in node)
    return 0


@pytest.fixture(scope="module")
def lung2(shared_data: Path):
    s = bench_data.Structure("lung2", shared_data / "pyradiomics/lung2_image.nrrd",
                             shared_data / "pyradiomics/lung2_label.nrrd", (1,), "ct")
    image, label, axis = bench_data.load_structure(s)
    image, label = bench_data.crop_around(image, label, axis)
    return image, label.array > 0


# -- the CI requirement: the quick run ---------------------------------------------------------------
def test_quick_bench_writes_a_finite_report(tmp_path: Path, shared_data: Path) -> None:
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    assert bench.bench_command(parser.parse_args(["--quick", "--out", str(tmp_path), "--device", "cpu"])) == 0
    report = (tmp_path / "BENCHMARKS.md").read_text()
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert _finite_leaves(results) == []
    assert _metric_count(results) > 20
    for section in bench.SECTIONS:
        assert results[section]["seconds"] > 0, section
    assert "## Main table" in report and "| **" in report
    assert results["meta"]["quick"] and results["meta"]["cpu_cores"] >= 1 and results["meta"]["date_utc"]
    for png in ("propagation_dice", "propagation_montage", "cross_dice",
                "image_montage", "speed_time"):
        assert (tmp_path / "bench" / f"{png}.png").stat().st_size > 1000, png
        assert f"bench/{png}.png" in report
    seen = {r["seen"] for r in results["propagation"]["rows"]}
    assert "no" in seen  # the quick subset keeps held-out material
    # k = 1: the rule's competitor (registration stopped as auto stops it) is scored on the same rows
    one = [r for r in results["propagation"]["rows"] if r["k"] == 1 and "methods" in r]
    assert one and all(0 <= r["one_slice_registration"] <= 1 for r in one)
    assert "| seen | n | model | registration as auto runs it |" in report
    # in-context use: every ambiguity case scored against its own and the other targets
    ic = results["in_context"]
    assert len(ic["rows"]) >= 3 and "## Does the model read its examples?" in report
    for row in ic["rows"]:
        assert 0 <= row["follows_fraction"] <= 1 and row["n"] >= 2 * len(row["query_slices"])
    # the model card's tables come from this very run, and a second write replaces the first
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# A model\n\nWhat it is for.\n")
    for _ in range(2):
        bench_report.write_card_tables(card, results, {"again": results})
    text = card.read_text()
    assert text.startswith("# A model") and text.count(bench_report.CARD_BEGIN) == 1
    assert "| benchmark | this model | again |" in text and "Ambiguity test" in text
    nets = {v["net"] for v in results["speed"]["volumes"]}
    assert nets == {"medgen", "universeg"}
    # `medgen run` as users meet it: a fresh process, cold and warm, with what the self-check chose
    (user,) = results["speed"]["user_runs"]
    assert user["cold_wall"] > user["warm_engine"] > 0 and user["chosen"][0].startswith("label 1:")
    assert "### As users run it" in report


# -- baselines on real data ---------------------------------------------------------------------------
def test_fill_between_slices_reproduces_the_labelled_slices(lung2) -> None:
    """ITK's contour interpolation between two labelled slices of a real lesion: the labelled
    slices come back unchanged, every slice between them is filled, nothing outside them."""
    _, truth = lung2
    present = np.nonzero(truth.any((1, 2)))[0]
    a, b = int(present[1]), int(present[-2])
    out = bl.fill_between_slices(truth, [a, b])
    assert np.array_equal(out[a], truth[a]) and np.array_equal(out[b], truth[b])
    assert all(out[s].any() for s in range(a, b + 1))
    assert not out[:a].any() and not out[b + 1:].any()
    between = list(range(a + 1, b))
    assert dice(out[between], truth[between]) > 0.5


def test_fill_between_slices_survives_repeated_calls(lung2) -> None:
    """The ITK module corrupted the heap when threaded (a malloc abort on the second call)."""
    _, truth = lung2
    present = np.nonzero(truth.any((1, 2)))[0]
    for given in ([int(present[0])], [int(present[0]), int(present[-1])], list(map(int, present[::2]))):
        bl.fill_between_slices(truth, given)


def test_registration_propagation_follows_the_lesion(lung2) -> None:
    image, truth = lung2
    present = np.nonzero(truth.any((1, 2)))[0]
    a, b = int(present[1]), int(present[-2])
    norm = fit_normalizer(image.array, "ct", clip=True)
    out = bl.registration_propagate(norm(image.array), {a: truth[a], b: truth[b]}, image.slice_spacing(0))
    assert np.array_equal(out[a], truth[a]) and np.array_equal(out[b], truth[b])
    between = list(range(a + 1, b))
    assert dice(out[between], truth[between]) > 0.5


def test_nearest_copy_takes_the_closest_labelled_slice(lung2) -> None:
    _, truth = lung2
    present = np.nonzero(truth.any((1, 2)))[0]
    a, b = int(present[0]), int(present[-1])
    out = bl.copy_nearest(truth, [a, b])
    assert np.array_equal(out[0], truth[a]) and np.array_equal(out[-1], truth[b])
    assert np.array_equal(out[a + (b - a) // 2 - (1 if (b - a) % 2 == 0 else 0)], truth[a])


def test_multi_atlas_recovers_a_known_mask(shared_data: Path) -> None:
    """A BUSI image registered onto itself returns its own mask; voting ties go to background."""
    image = read_volume(shared_data / "busi/images/malignant_063.png").array[0]
    mask = read_volume(shared_data / "busi/masks/malignant_063.png", label=True).array[0] > 0
    warped = bl.atlas_register(image, image, mask)
    assert dice(warped, mask) > 0.9
    empty = np.zeros_like(mask)
    assert not bl.majority_vote([mask, empty]).any()
    assert np.array_equal(bl.majority_vote([mask, mask, empty]), mask)
    assert np.array_equal(bl.mean_of_masks([mask], mask.shape), mask)


def test_denoising_baselines_beat_the_noisy_input(sample_t1) -> None:
    """NL-means and TV with their parameter picked on other slices improve a real slice."""
    clean = sample_t1.array.astype(np.float32)
    norm = fit_normalizer(clean, "mr")
    noisy = bench_data.add_noise(clean, "mr", 0.08, norm, np.random.default_rng(0))
    ex, query = [30, 50], 40
    xs, ys = [norm(noisy[i]) for i in ex], [norm(clean[i]) for i in ex]
    sigma = bl.noise_sigma(xs, ys)
    h = bl.pick_parameter(lambda x, p: bl.nl_means(x, p, sigma), bl.NLM_FACTORS, xs, ys)
    w = bl.pick_parameter(bl.tv, bl.TV_WEIGHTS, xs, ys)
    err = lambda y: float(np.mean((y - norm(clean[query])) ** 2))
    before = err(norm(noisy[query]))
    assert err(bl.nl_means(norm(noisy[query]), h, sigma)) < before
    assert err(bl.tv(norm(noisy[query]), w)) < before


def test_biharmonic_fills_only_the_hole(sample_t1) -> None:
    image = sample_t1.array[40].astype(np.float32)
    hole = np.zeros(image.shape, bool)
    hole[40:50, 30:40] = True
    out = bl.biharmonic(np.where(hole, 0, image), hole)
    assert np.array_equal(out[~hole], image[~hole])
    assert np.abs(out[hole] - image[hole]).mean() < np.abs(image[hole]).mean()


def test_synthesis_baselines_map_intensities(shared_data: Path) -> None:
    t1 = read_volume(shared_data / "brats/BraTS-MET-AURORA-example/t1.nii.gz").array[70].astype(np.float32)
    t2 = read_volume(shared_data / "brats/BraTS-MET-AURORA-example/t2.nii.gz").array[70].astype(np.float32)
    fg = t1 > 0
    matched = bl.histogram_match(t1[fg], t2[fg])
    q = np.linspace(5, 95, 19)
    assert np.allclose(np.percentile(matched, q), np.percentile(t2[fg], q), atol=np.ptp(t2[fg]) * 0.02)
    line = bl.linear_map(t1[fg], 2 * t1[fg] + 5, t1[fg])
    assert np.allclose(line, 2 * t1[fg] + 5, rtol=1e-3, atol=1e-2)


# -- scoring, slice choice, reference network ---------------------------------------------------------
def test_scores_stay_finite_for_an_empty_prediction(lung2) -> None:
    _, truth = lung2
    s = seg_scores(np.zeros_like(truth), truth, (5.0, 0.6, 0.6))
    assert s["dice"] == 0 and s["empty"] and math.isfinite(s["hd95"]) and s["hd95"] > 0
    same = seg_scores(truth, truth, (5.0, 0.6, 0.6))
    assert same["dice"] == pytest.approx(1.0) and same["hd95"] == 0


def test_spread_slices_are_stratified_and_seeded() -> None:
    present = np.arange(20, 41)
    picks = bench_data.spread_slices(present, 3, np.random.default_rng(0))
    assert picks == bench_data.spread_slices(present, 3, np.random.default_rng(0))
    assert len(picks) == 3 and picks[0] < 27 <= picks[1] < 34 <= picks[2] <= 40


def test_universeg_reference_has_universeg_size_and_cost() -> None:
    net = universeg_reference()
    assert count_parameters(net) == pytest.approx(1.18e6, rel=0.01)
    out = net(torch.rand(2, 1, 64, 64), torch.rand(2, 3, 1, 64, 64), torch.rand(2, 3, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64)
    f1, f8 = universeg_flops(net, 1, 64), universeg_flops(net, 8, 64)
    assert 6 < f8 / f1 < 8.5  # every support pair costs about a network pass


# -- the folder layout for users' own data --------------------------------------------------------------
def _layout(root: Path) -> Path:
    """3d/<case>/image+label from the MNI152 sample, 2d/<set>/images+masks from its slices."""
    case = root / "3d" / "mni"
    case.mkdir(parents=True)
    image, tissue = sitk_slab(SAMPLE_T1, 30, 50), sitk_slab(SAMPLE_TISSUE, 30, 50)
    sitk.WriteImage(image, str(case / "image.nii.gz"))
    sitk.WriteImage(tissue, str(case / "label.nii.gz"))
    for sub in ("images", "masks"):
        (root / "2d" / "tissue" / sub).mkdir(parents=True)
    t1, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(tissue)
    for i in (2, 8, 14):
        png = (255 * t1[i] / t1.max()).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(png), str(root / "2d/tissue/images" / f"s{i}.png"))
        sitk.WriteImage(sitk.GetImageFromArray((lab[i] == 2).astype(np.uint8)), str(root / "2d/tissue/masks" / f"s{i}.png"))
    (root / "meta.json").write_text(json.dumps({"modality": "mr", "axis": "axial"}))
    return root


def test_folder_layout_becomes_a_configuration(tmp_path: Path) -> None:
    cfg = bench_data.config_from_folder(_layout(tmp_path / "data"))
    assert [s.values for s in cfg.structures] == [(1,), (2,)]
    assert cfg.structures[0].modality == "mr" and cfg.structures[0].seen == "unknown"
    assert len(cfg.pair_sets) == 1 and len(cfg.pair_sets[0].queries) == 3 and cfg.pair_sets[0].leave_one_out
    assert [c.task for c in cfg.image_cases] == ["denoise"]


@pytest.mark.parametrize("inputs", ["slice-nlm", "tuned-nlm+noisy"])
def test_untrained_model_returns_its_classical_start(tmp_path: Path, inputs: str) -> None:
    """Plumbing check on the user layout: a fresh network's image head is the identity, so its
    'denoised' volume is exactly the non-local-means start its config names (per-slice, or fitted
    on the example pairs) mapped back to the input's units; it must clearly beat the noisy input,
    which a scaling, axis or slice mix-up would not."""
    from medgen.core.config import ModelConfig

    cfg = bench_data.config_from_folder(_layout(tmp_path / "data"), quick=True)
    torch.manual_seed(0)
    model = InContextUNet(ModelConfig(denoise_inputs=inputs)).eval()
    rows, _ = bench.image_tasks(model, cfg, "cpu", lambda m: None)
    m = rows["rows"][0]["methods"]
    assert m["ours"]["psnr"] > m["noisy input"]["psnr"] + 1.0
    assert m["ours"]["ssim"] > m["noisy input"]["ssim"]


def test_denoising_slab_timing_extrapolates_the_per_slice_share_only() -> None:
    """A slab-timed denoising row (the bench's 300 x 512^2 volumes) reports the whole volume's
    seconds as one cold run plus the per-slice share of the remaining slices, measured from two
    warm runs, with the same fields as a whole-volume row (the report reads both alike)."""
    from medgen_dev.bench.speed import volume_run

    whole = volume_run("denoise", (12, 64, 64), 2, "cpu")
    cut = volume_run("denoise", (12, 64, 64), 2, "cpu", slab=2)
    assert not whole["extrapolated"] and cut["extrapolated"] and cut["slices_timed"] == 2
    assert set(whole) <= set(cut) and cut["seconds_per_slice"] >= 0
    assert cut["seconds"] >= cut["seconds_per_slice"] * 10  # the ten untimed slices are counted


def test_one_slice_rule_table_counts_only_clear_wins() -> None:
    """The k = 1 rule's table: means per method, and rows ahead of / behind the model by more than
    0.01 (closer is a tie), for every other method (registration, the model at other reaches)."""
    from medgen_dev.bench.k1 import table

    rows = [{"structure": "a", "model": 0.80, "registration": 0.70, "model, reach 3 radii": 0.80},
            {"structure": "b", "model": 0.60, "registration": 0.605, "model, reach 3 radii": 0.70},
            {"structure": "c", "model": 0.50, "registration": 0.90, "model, reach 3 radii": 0.40}]
    lines = table(rows).splitlines()
    assert lines[2] == "| model | 0.633 | – | – |"
    assert lines[3] == "| registration | 0.735 | 1 of 3 | 1 of 3 |"
    assert lines[4] == "| model, reach 3 radii | 0.633 | 1 of 3 | 1 of 3 |"


def test_one_pair_table_names_the_best_method_besides_model_and_auto() -> None:
    """`k1 --images`: the noisy input is not a method, and model and auto have their own columns."""
    from medgen_dev.bench.k1 import image_table

    rows = [{"case": "AURORA 10%", "task": "denoise", "ours": 29.31, "auto": 30.02, "noisy input": 31.0,
             "NL-means (h=0.8 sigma)": 29.34, "TV Chambolle (w=0.1)": 30.02}]
    assert image_table(rows).splitlines()[2] == "| AURORA 10% | 29.31 | 30.02 | TV Chambolle (w=0.1) 30.02 |"


def test_margin_sweep_assembles_what_auto_would_give() -> None:
    """`bench.margin`: a method whose fold Dice beats the model's by 0.015 replaces it at margin 0.01
    (its whole-volume output, the labelled slices kept as given) and not at 0.02; the table's means."""
    from medgen_dev.bench.margin import auto_at, table

    own = {2: np.ones((4, 4), np.uint8), 6: np.ones((4, 4), np.uint8)}
    records = [(1, "beyond", m, np.array([100 * d, 100.0, 100.0]), h)
               for h in (2, 6) for m, d in {"model": 0.80, "registration": 0.815, "nearest": 0.5}.items()]
    outputs = {m: np.zeros((9, 4, 4), bool) for m in ("model", "fill", "registration", "nearest")}
    outputs["registration"][:, :2] = True
    outputs["model"][:, 2:] = True
    out, chosen = auto_at(records, own, outputs, 0.01)
    assert chosen == "registration" and out[4, :2].all() and not out[4, 2:].any() and out[2].all()
    out, chosen = auto_at(records, own, outputs, 0.02)
    assert chosen == "model" and out[4, 2:].all() and not out[4, :2].any() and out[6].all()
    rows = [{"structure": "a", "k": 2, 0.01: (0.9, "registration"), 0.02: (0.8, "model")},
            {"structure": "b", "k": 3, 0.01: (0.5, "model"), 0.02: (0.7, "model")}]
    lines = table(rows, (0.01, 0.02)).splitlines()
    assert lines[0] == "| margin | mean Dice | k = 2 | k = 3 |"
    assert lines[2] == "| 0.01 | 0.7000 | 0.9000 | 0.5000 |"
    assert lines[3] == "| 0.02 (shipped) | 0.7500 | 0.8000 | 0.7000 |"


def test_dev_ambiguity_cases_are_other_structures_than_the_bench_and_all_runnable(shared_data: Path) -> None:
    """Checkpoints are chosen on DEV_CASES so that the bench's ambiguity row is not tuned on: no
    (image, structure) of the bench may appear there, and every dev case must have slices that
    hold all of its targets (else the test has no queries)."""
    from medgen_dev.bench import incontext

    def structures(cases):
        return {(c.image, path, values) for c in cases for path, values in c.targets.values()}

    assert not structures(incontext.DEV_CASES) & structures(incontext.CASES)
    for case in incontext.DEV_CASES:
        _, _, masks = incontext._load(case, shared_data)
        examples, queries = incontext._slices(masks, 3, 6)
        assert len(examples) == 3 and len(queries) >= 3, case.name
