"""Slice-by-slice segmentation from other images' examples (medgen/infer/slicewise.py): the
self-check hides example pairs in turn, scores the model and the pixel classifier on them, and
each label gets the better method and that method's leave-one-out Dice as its estimate.

Real data: the shipped MNI152 2 mm sample and its tissue map (1 grey, 2 white matter). Example
pairs are axial slices handed over as pairs of another image (no slice index), queries are other
slices of the same volume: grey and white matter are neighbours of like texture that only their
intensity tells apart, the case of the bench's ambiguity test where the model alone followed its
examples least.
"""

from __future__ import annotations

import numpy as np
import pytest

from medgen.core.errors import InputError
from medgen.core.volume import Volume
from medgen.infer import classical
from medgen.infer.pipeline import RunOptions, run, run_with_report
from medgen.infer.segment import SegmentSettings
from medgen.metrics import dice
from medgen.prompts import pairs_from_volumes

EXAMPLES = [30, 40, 50]
QUERIES = [35, 45]
INDEPENDENT = SegmentSettings(mode="independent")


@pytest.fixture(scope="module")
def brain(sample_t1, sample_tissue) -> tuple[list, Volume, np.ndarray]:
    examples = pairs_from_volumes(sample_t1, sample_tissue, 0, EXAMPLES, "segment", "mr", own=False)
    query = Volume(np.ascontiguousarray(sample_t1.array[QUERIES]), sample_t1.spacing)
    return examples, query, sample_tissue.array[QUERIES]


def _dice_by_label(out: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    return {v: float(np.mean([dice(o == v, t == v) for o, t in zip(out, truth)])) for v in (1, 2)}


def test_pixel_classifier_learns_a_tissue_from_its_examples(sample_t1, sample_tissue) -> None:
    """The classical candidate alone: fitted on two slices' white matter, it finds it on a third."""
    norm = lambda s: (s - np.percentile(sample_t1.array, 1)) / np.ptp(np.percentile(sample_t1.array, (1, 99)))
    feats = [classical.pixel_features(norm(sample_t1.array[s])) for s in (30, 50)]
    forest = classical.fit_pixel_classifier(feats, [sample_tissue.array[s] == 2 for s in (30, 50)])
    pred = classical.predict_pixels(forest, classical.pixel_features(norm(sample_t1.array[40])))
    assert dice(pred, sample_tissue.array[40] == 2) > 0.8


@pytest.mark.model
def test_auto_gives_each_label_the_better_method_and_an_honest_estimate(model, brain) -> None:
    examples, query, truth = brain
    options = lambda method: RunOptions("segment", 0, "mr", "cpu", method=method, segment=INDEPENDENT)
    result = run_with_report(model, query, examples, options("auto"))
    forced = {m: run(model, query, examples, options(m)).array for m in ("model", "classifier")}
    got = _dice_by_label(result.volume.array, truth)
    by_method = {m: _dice_by_label(out, truth) for m, out in forced.items()}
    for v, estimate in zip((1, 2), result.report.estimates):
        assert set(estimate.candidates) == {"model", "classifier"} and estimate.folds == len(EXAMPLES)
        scores = estimate.candidates
        expected = "classifier" if scores["classifier"] > scores["model"] + 0.02 else "model"
        assert estimate.chosen == expected and estimate.estimate == scores[expected]
        # the output is that method's (labels claim voxels in order, so allow the overlap's share)
        assert abs(got[v] - by_method[expected][v]) < 0.02, (v, got, by_method)
        # the leave-one-out Dice on the hidden pairs stands for the queries' Dice
        assert abs(estimate.estimate - got[v]) < 0.15, (v, estimate, got)
        # each output follows its own label's examples, not the neighbour's
        other = 3 - v
        assert all(dice(o == v, t == v) > dice(o == v, t == other) for o, t in zip(result.volume.array, truth))
    assert "hidden example pairs" in result.report.estimates[0].note
    assert all("chosen by the user" in e.note for e in run_with_report(
        model, query, examples, options("classifier")).report.estimates)


def test_the_classifier_does_not_propagate(model, sample_t1, sample_tissue) -> None:
    own = pairs_from_volumes(sample_t1, sample_tissue, 0, EXAMPLES, "segment", "mr", own=True)
    with pytest.raises(InputError, match="independent segmentation mode"):
        run(model, sample_t1, own, RunOptions("segment", 0, "mr", "cpu", method="classifier"))


def test_propagation_methods_are_refused_slice_by_slice(model, brain) -> None:
    examples, query, _ = brain
    with pytest.raises(InputError, match="none of the examples is one"):
        run(model, query, examples, RunOptions("segment", 0, "mr", "cpu", method="registration", segment=INDEPENDENT))


def test_cancel_during_the_check_returns_none(model, brain) -> None:
    """A cancel while the hidden pairs are scored stops the run: nothing is returned."""
    examples, query, _ = brain
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) >= 3

    assert run(model, query, examples, RunOptions("segment", 0, "mr", "cpu", segment=INDEPENDENT),
               cancel=cancel) is None
