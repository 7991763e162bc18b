"""Self-check on the user's own examples: pick the best method per structure or task, and say how
good the result should be.

The examples are ground truth the user already gave. With k >= 2 of them, each candidate method
is run with one example hidden and scored on it (leave-one-out); the best candidate on the hidden
examples does the run, and its leave-one-out score gives the run's estimate. No peer (UniverSeg,
MultiverSeg, nnInteractive, SAM2-style propagation) returns any estimate of its own quality.

Propagation (examples are labelled slices of the volume) — hiding a slice must simulate the
user's geometry, which has two different jobs:
- *between* labelled slices (interpolation): an interior labelled slice is hidden and predicted
  from its two labelled neighbours. The gap it is predicted across is the sum of the two gaps
  around it, about twice the user's own gaps, so these estimates err on the pessimistic side.
- *beyond* the outermost labelled slices (extrapolation): the outermost labelled slice of the
  structure is hidden and predicted from the next one inwards, a one-sided carry over one gap,
  as the run's open ends carry the structure outwards.
Registration and nearest copy never stop on their own past the outermost labelled slice; in the
run their open ends stop by the model's rule (segment.end_reaches: one equivalent radius of the
structure, sooner where the labelled slices' area profile closes) and registration also where
the tissue under the carried mask changes (classical.registration_propagate's tissue_stop). The
folds measure how well each method carries the structure across a gap, so there no open end is
capped by the reach or the profile (the model's included): the hidden outermost slice lies a
whole gap out, mostly farther than the run's reach, and capped candidates would all score 0 (bench, k = 3: estimates of 0.04-0.07 and a choice by ties).
Each fold runs on the stack of slices from the hidden slice's labelled neighbour(s) to itself
(the candidates never see further than that geometry needs); the other examples still join the
model's context, as in the run. With at least MIN_SPLIT_FOLDS interior folds the best method is
chosen separately for the two jobs (fill between slices cannot extrapolate, and the bench shows
different winners inside and outside the labelled span), so "auto" may answer with e.g. fill
between the labelled slices and registration beyond them. With fewer (two or three labelled
slices) one method does the whole run, the best on all folds pooled: a single hidden middle slice
is too little evidence for a choice of its own. Dice is pooled over the hidden slices
(2 sum TP / sum(|P| + |T|)), like a volume Dice. With two labelled slices there is no interior
slice to hide: of the model and registration, the one that carried the structure best from one to
the other (the extrapolation folds, over exactly that gap) is used (CARRY_METHODS: nearest copy's
score there says only how alike the two slices are). Another method replaces the model only when
it beats the model's score by more than MODEL_MARGIN. Up to MAX_FOLDS labelled slices are hidden
in turn (the outermost always, interior ones spread over the span).

With one labelled slice (of a structure, or one example pair) there is nothing to hold out: the
report says so and a rule from the bench at k = 1 decides (docs/BENCHMARKS.md): the model won on
the mean of the structures it never saw in training (Dice 0.61 against registration 0.20) and of
the ones it trained on (0.73 against 0.57; registration still won six of those sixteen rows, by
0.02-0.04 on four large organs and by 0.21 on the aorta and the lateral ventricle, which one
labelled slice cannot tell apart from the rest), so the rule is the model. Registration as auto
runs it is another method: its open ends stop by the model's reach and the tissue under the mask
instead of running to the volume's edges. At k = 1 it was ahead on the bench's 18 rows (mean Dice
0.737 against the model's 0.710; 10 rows won by more than 0.01, 3 lost) and level on the 22
structures of Resources/Bench/calibration.json, which the bench does not score (0.498 against
0.487; 8 won, 11 lost; `python -m medgen_dev.bench.k1 [--config FILE]`, 2026-12-03). As at k >= 2,
another method replaces the model only when it is ahead by more than MODEL_MARGIN (0.02), and on
the structures chosen apart from the bench it was not (+0.011), so the rule stays the model. For synthesis and
inpainting the bench's classical methods are the rule (the linear map, biharmonic: from one pair
each within 0.05 dB of the model on every held-out case, `python -m medgen_dev.bench.k1 --images`).
Denoising ranks its tuned classical candidates on the one pair instead (`fit_scores`).

Image tasks hide one example pair at a time; denoising's classical parameters (NL-means h, TV
weight) are tuned once on all pairs (what the run uses), synthesis maps are refitted without the
hidden pair. Scores are PSNR over the tissue of the hidden pair (the hole for inpainting),
averaged over folds; a classical method replaces the model only when ahead by more than
IMAGE_MARGIN dB.

A segmentation's reported estimate is the chosen method's leave-one-out Dice mapped to the Dice
the run should get (`expected_dice`, a straight line fitted on structures the bench does not
score): the hidden slice is predicted across twice the user's gap, so the raw score alone read
0.18 below the run's Dice. The report keeps the raw score beside it (`leave_one_out`). The method
is chosen on the same folds it is reported from, which makes the estimate slightly optimistic; the
bench's calibration table says how far both stand from the Dice the runs got.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from medgen.core.errors import Cancelled, InputError
from medgen.infer import classical, interpolate, segment
from medgen.prompts import TISSUE_LEVEL, Example

SCHEMA_VERSION = 2  # 2: "estimate" is the expected Dice (expected_dice), "leave_one_out" the raw score
MAX_FOLDS = 5
# registration's displacement field is estimated on at most this many pixels a side (a whole-factor
# shrink of the window, applied at full resolution): the bench's propagation windows are all
# smaller (<= 204 pixels, unchanged); on its 300 x 512^2 user run (a whole-slice window) auto took
# 522 s against 43 s for the model, 176 s once capped (docs/BENCHMARKS.md, "As users run it").
# 128 was tried (2026-12-03): the 200 x 256^2 user run took 16.9 s instead of 28.4 s (model alone
# 11.8 s), but brain windows of 130-200 pixels around thin structures lost Dice (auto, bench: caudate
# k = 5 0.830 -> 0.818, lateral ventricle k = 3 0.864 -> 0.845), so 256 stays
REG_MAX_SIDE = 256
# demons iterations of the self-check's registration (the bench's baseline keeps 40): on the bench's
# propagation rows, plain registration from the same labelled slices at 20 moved organs' Dice by at
# most 0.005 (CT liver 0.947 / 0.945, MR liver 0.954 / 0.954, CT aorta 0.831 / 0.825) for half the time
REG_ITERATIONS = 20
# ...on a grid twice as coarse, then this many at the window's grid (classical._field's pyramid):
# on the 22 structures of Resources/Bench/calibration.json (66 runs) auto's mean Dice 0.745 ->
# 0.756 (10 + 5: 0.750, 20 + 10: 0.758, 40 + 5: 0.756), and the 200 x 256^2 user run's warm engine
# 26.7 -> 19.0 s (model alone 7.9 s; 2026-12-03)
REG_REFINE = 5
FOLD_REACH = 1e6  # radii: uncapped open ends inside the folds
# another method replaces the model only when its leave-one-out Dice is more than this above the
# model's: one or two hidden slices cannot separate closer scores. Chosen on the 22 structures of
# Resources/Bench/calibration.json (66 runs at k = 2 / 3 / 5, `python -m medgen_dev.bench.margin`,
# 2026-12-04): auto's mean Dice 0.7507 at 0, 0.7558 at 0.01, 0.7563 at 0.02 (0.015-0.025 within
# 0.0001 of it), 0.7527 at 0.05; on the bench 0.01 had let a fold score 0.01 above the model's put
# registration between the labelled slices of TCGA-DU-7294 k = 5, 0.022 under the model's Dice
MODEL_MARGIN = 0.02
# the same for image tasks, in dB of the held-out pairs' PSNR: on 18 image cases the bench does not
# score (Resources/Bench/image_calibration.json, `python -m medgen_dev.bench.image_margin`,
# 2026-12-04) auto's mean PSNR behind the best method per case was 0.035 dB at 0, 0.027 at 0.05,
# 0.012 at 0.1-0.5 (worst case -0.19 dB; at 0: -0.26 and five classical picks, three of them the
# model's cases) and 0.027 at 1. Denoising's classical candidates are tuned on every pair, the
# hidden one included, so theirs are the optimistic fold scores
IMAGE_MARGIN = 0.2
# interior folds needed before the run takes a separate method between the labelled slices; with
# one, a single hidden middle slice (predicted across twice the user's gap) decided "between" alone
# and missed by up to 0.28 Dice (bench k = 3: lateral ventricle, caudate), so one method picked
# on all folds pooled does the whole run instead
MIN_SPLIT_FOLDS = 2
SEGMENT_METHODS = ("model", "fill", "registration", "nearest")
BEYOND_METHODS = ("model", "registration", "nearest")  # fill between slices does not extrapolate
# with two labelled slices the folds carry each across the whole gap to the other: nearest copy's
# score is then only how alike the two slices are, a test it cannot fail by losing the structure as
# a carry can, while the run copies each slice over half the gap only. On 22 structures the bench
# does not score (Resources/Bench/calibration.json, k = 2) it was chosen on 6 and was the best
# method on none (mean Dice 0.44 against the model's 0.56 and registration's 0.60), so the two
# methods that carry the structure compete there
CARRY_METHODS = ("model", "registration")
IMAGE_METHODS = {"denoise": ("model", "nl-means", "tv"),
                 "synthesize": ("model", "linear", "histogram"),
                 "inpaint": ("model", "biharmonic")}
# the Dice a run gets, from its chosen method's leave-one-out Dice: least squares over 66 runs of
# auto on 22 structures that are not rows of the bench (Resources/Bench/calibration.json, k = 2 / 3 /
# 5; `python -m medgen_dev.bench.calibrate`, 2026-12-04, refitted with REG_REFINE and MODEL_MARGIN 0.02,
# docs/bench/calibration_fit.json): mean absolute error 0.200 -> 0.076 with each structure left out of
# its own fit (k = 2: 0.14, k = 3: 0.05, k = 5: 0.04). The hidden slice lies across twice the user's
# gap, so the raw score is pessimistic (bias -0.195 there); terms in k did not lower the error enough
# to keep them
EXPECTED_DICE = (0.473, 0.505)
K1_RULE = {"segment": "model", "denoise": "nl-means", "synthesize": "linear", "inpaint": "biharmonic"}
K1_WHY = {"segment": "at k = 1 the model led the bench's baselines, and registration with the model's stops was "
                      "only level with it on 22 structures the bench does not score",
          "denoise": "the pair has no foreground to rank the tuned methods on, and from one pair NL-means beat the "
                     "model on every held-out denoising case (bench)",
          "synthesize": "from one pair the linear map was within 0.04 dB of the model on every held-out case (bench)",
          "inpaint": "from one pair biharmonic was within 0.05 dB of the model on the held-out case (bench)"}
# what a user with one example can do about it: with two, the folds score the candidates
K1_HINT = {"segment": "label a second slice of it for an estimate and a choice of method",
           "image": "give a second example pair for an estimate and a choice of method"}
Progress = Callable[[float, str], None]


def methods(task: str) -> tuple[str, ...]:
    """The methods a run of `task` may be asked for ("auto" first; the classifier segments slice by
    slice only, slicewise.py)."""
    return ("auto",) + (SEGMENT_METHODS + ("classifier",) if task == "segment" else IMAGE_METHODS[task])


def check_method(task: str, method: str) -> None:
    if method not in methods(task):
        raise InputError(f"unknown method {method!r} for {task}: use {', '.join(methods(task))}")


# -- the report ------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """One structure's (label's) or one image task's choice and leave-one-out scores."""

    name: str  # "label 3" or the task
    metric: str  # "dice" or "psnr"
    chosen: str  # the method that made the output (or "fill between, registration beyond")
    estimate: float | None  # what the output should score (segmentation: expected_dice); None: not estimated
    candidates: dict[str, float]  # every candidate's leave-one-out score (whole method)
    examples: int  # labelled slices holding this label, or example pairs
    folds: int  # hidden examples scored
    parts: dict[str, str] = field(default_factory=dict)  # segmentation: {"between": m, "beyond": m}
    note: str = ""
    leave_one_out: float | None = None  # the chosen method's own score on the hidden examples

    def line(self) -> str:
        unit = "Dice" if self.metric == "dice" else "PSNR"
        fmt = (lambda v: f"{v:.2f}") if self.metric == "dice" else (lambda v: f"{v:.1f} dB")
        what = "labelled slice" if self.metric == "dice" else "example pair"
        count = f"from {self.examples} {what}{'s' if self.examples != 1 else ''}"
        if self.estimate is None:
            return f"{self.name}: {self.chosen}, no estimate {count}" + (f" ({self.note})" if self.note else "")
        others = ", ".join(f"{m} {fmt(v)}" for m, v in self.candidates.items() if m != self.chosen)
        if self.leave_one_out is not None and self.leave_one_out != self.estimate:
            others = f"leave-one-out {fmt(self.leave_one_out)}" + (f"; {others}" if others else "")
        return (f"{self.name}: {self.chosen}, estimated {unit} {fmt(self.estimate)}"
                + (f" ({others})" if others else "") + f" {count}" + (f"; {self.note}" if self.note else ""))


@dataclass
class SelfCheckReport:
    """What `run_with_report` returns beside the volume (and `medgen run --report` writes)."""

    task: str
    method: str  # what was asked: "auto" or a forced method
    estimates: list[Estimate]
    check_seconds: float = 0.0  # the leave-one-out runs
    run_seconds: float = 0.0  # producing the output itself

    def lines(self) -> list[str]:
        return [e.line() for e in self.estimates]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA_VERSION, **asdict(self)}

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path


def expected_dice(leave_one_out: float) -> float:
    """The Dice the run should get, from the chosen method's leave-one-out Dice (EXPECTED_DICE)."""
    a, b = EXPECTED_DICE
    return float(np.clip(a + b * leave_one_out, 0.0, 1.0))


def _report_value(v: float) -> float:
    return float(round(min(v, 999.0), 4))  # identical PSNR is inf; JSON has no inf


# -- segmentation by propagation -------------------------------------------------------------------
@dataclass
class SegmentContext:
    """What the folds need from the run (all slices-first, axis 0 = propagation axis)."""

    slices: np.ndarray  # input units
    examples: list[Example]
    labels: list[int]
    # every fold's (stack, examples, hidden slice of the stack) -> its probabilities there [L, 1, H, W]
    model_folds: Callable[[list[tuple[np.ndarray, list[Example], int]]], list[np.ndarray]]
    reg_norm: Callable[[np.ndarray], np.ndarray]  # normalisation for registration (clipped)
    spacing: tuple[float, float]
    threshold: float = 0.5
    cancel: Callable[[], bool] = lambda: False
    fields: classical.FieldCache = field(default_factory=classical.FieldCache)  # shared with the run


def fold_slices(given: list[int], max_folds: int = MAX_FOLDS) -> list[int]:
    """The labelled slices to hide: both outermost, then interior ones spread over the span."""
    given = sorted(given)
    if len(given) <= max_folds:
        return given
    inner = given[1:-1]
    picks = np.linspace(0, len(inner) - 1, max_folds - 2).round().astype(int)
    return [given[0]] + [inner[i] for i in sorted(set(picks))] + [given[-1]]


def _counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([np.sum(pred & truth), np.sum(pred), np.sum(truth)], np.float64)


def _dice(c: np.ndarray) -> float:
    return 1.0 if c[1] + c[2] == 0 else float(2 * c[0] / (c[1] + c[2]))


Record = tuple[int, str, str, np.ndarray, int]  # label, region, method, [tp, |P|, |T|], hidden slice


def check_segmentation(ctx: SegmentContext, progress: Progress) -> list[Record]:
    """Leave-one-out over the labelled slices: one record per label, method and hidden slice.

    The model's folds step together in one batched propagation (segment.propagate_together),
    beside the classical candidates' folds, which run one per remaining core: each fold alone is a
    short propagation whose single-slice steps left cores idle, and a registration chain (bench
    rows, 2 cores, same records: CT liver k = 3 self-check 4.6 -> 3.0 s with the folds side by side)."""
    import torch

    own = {e.slice_index: e for e in ctx.examples if e.slice_index is not None}
    given = sorted(own)
    has = {v: [s for s in given if np.any(own[s].target == v)] for v in ctx.labels}
    jobs = []
    for h in fold_slices(given) if len(given) > 1 else []:
        rest = [s for s in given if s != h]
        lo = max([s for s in rest if s < h], default=h)
        hi = min([s for s in rest if s > h], default=h)
        regions = {v: _region(h, has[v]) for v in ctx.labels}
        if any(regions.values()):
            jobs.append((h, lo, hi, regions))
    if not jobs:
        return []

    def classical_fold(job: tuple[int, int, int, dict]) -> dict[int, dict[str, np.ndarray]]:
        h, lo, hi, regions = job
        return _fold_predictions(ctx, own, h, lo, hi, [v for v in ctx.labels if regions[v]])
    records = []
    with ThreadPoolExecutor(max(1, min(len(jobs) + 1, torch.get_num_threads()))) as pool:
        model = pool.submit(ctx.model_folds, [_fold_input(ctx, h, lo, hi) for h, lo, hi, _ in jobs])
        for i, ((h, lo, _, regions), preds) in enumerate(zip(jobs, pool.map(classical_fold, jobs))):
            probs = model.result()[i]
            for v, methods_ in preds.items():
                truth = own[h].target == v
                methods_ = {"model": probs[ctx.labels.index(v), 0] >= ctx.threshold, **methods_}
                for m, pred in methods_.items():
                    records.append((v, regions[v], m, _counts(pred, truth), h))
            progress((i + 1) / len(jobs), f"self-check: hid labelled slice {h} ({i + 1}/{len(jobs)})")
    return records


def _fold_input(ctx: SegmentContext, h: int, lo: int, hi: int) -> tuple[np.ndarray, list[Example], int]:
    """The model's fold hiding slice h: the stack lo..hi, the examples without h (those outside
    the stack join the context as other images' pairs would), and h's place in the stack."""
    fold_examples = [replace(e, slice_index=None if e.slice_index is None or e.slice_index == h
                             or not lo <= e.slice_index <= hi else e.slice_index - lo)
                     for e in ctx.examples if e.slice_index != h]
    return ctx.slices[lo:hi + 1], fold_examples, h - lo


def _region(h: int, with_label: list[int]) -> str | None:
    """Which job hiding slice h tests for a label: between / beyond its labelled span, or none."""
    if len(with_label) < 2 or h not in with_label:
        return None
    return "beyond" if h in (with_label[0], with_label[-1]) else "between"


def _fold_predictions(ctx: SegmentContext, own: dict[int, Example], h: int, lo: int, hi: int,
                      labels: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """Every classical candidate's prediction of slice h from the labelled slices lo..hi other than h."""
    stack = ctx.slices[lo:hi + 1]
    inside = [s for s in own if lo <= s <= hi and s != h]
    out = {}
    normed = None
    for v in labels:
        known = {s - lo: own[s].target == v for s in inside}
        with_v = {s: m for s, m in known.items() if m.any()}
        preds = {}
        if with_v:
            normed = ctx.reg_norm(stack) if normed is None else normed
            # the run's registration window (all of the label's slices), so the run reuses the
            # fold's displacement fields (FieldCache)
            box = classical.label_box([t.target == v for t in own.values() if np.any(t.target == v)],
                                      stack.shape[1:])
            preds["registration"] = classical.registration_propagate(
                normed, with_v, ctx.spacing, stop_at=h - lo, box=box, fields=ctx.fields, offset=lo,
                tissue_stop=True, max_side=REG_MAX_SIDE, iterations=REG_ITERATIONS, refine=REG_REFINE)[h - lo]
        else:
            preds["registration"] = np.zeros(stack.shape[1:], bool)
        preds["nearest"] = _nearest_at(known, h - lo)
        # score the fill the run would use: the run picks its backend from the label's labelled
        # slice count (interpolate.DENSE), not from the two the fold happens to see
        dense = sum(np.any(e.target == v) for e in own.values()) >= interpolate.DENSE
        preds["fill"] = _fill_at(with_v, h - lo, stack.shape, "distance" if dense else None)
        out[v] = preds
        if ctx.cancel():
            raise Cancelled("cancelled by the user; nothing was written")
    return out


def cap_open_ends(mask: np.ndarray, labelled: dict[int, np.ndarray], spacing: tuple[float, float],
                  thickness: float | None, extent: tuple[float, float]) -> np.ndarray:
    """A slices-first mask cut to the reach of the model's open ends past the outermost labelled
    slices (segment.reach). Registration and nearest copy never stop by themselves: on the bench
    they carried held-out lesions to the volume's edges (lung2 k = 5: Dice 0.25, HD95 155 mm),
    and the self-check's folds, which only see one gap past a labelled slice, cannot tell."""
    idx = sorted(s for s, m in labelled.items() if m.any())
    if not idx:
        return mask
    down, up = segment.end_reaches(labelled, spacing, thickness, extent)
    lo, hi = idx[0] - down, idx[-1] + up
    out = mask.copy()
    out[:max(lo, 0)] = False
    out[hi + 1:] = False
    return out


def _nearest_at(known: dict[int, np.ndarray], s: int) -> np.ndarray:
    idx = sorted(known)
    full = np.zeros((max(idx + [s]) + 1,) + next(iter(known.values())).shape, bool)
    for i in idx:
        full[i] = known[i]
    return classical.nearest_copy(full, idx)[s]


def _fill_at(with_v: dict[int, np.ndarray], s: int, shape: tuple[int, ...],
             backend_name: str | None = None) -> np.ndarray:
    """Fill between slices at s (empty where it cannot apply: fewer than two slices, outside)."""
    idx = sorted(with_v)
    if len(idx) < 2 or not idx[0] < s < idx[-1] or (backend_name is None and not interpolate.available()):
        return np.zeros(shape[1:], bool)
    stack = np.zeros(shape, bool)
    for i in idx:
        stack[i] = with_v[i]
    try:
        return interpolate.fill_between_slices(stack, idx, backend_name=backend_name)[s]
    except RuntimeError:  # ITK refused this structure
        return np.zeros(shape[1:], bool)


def choose_segmentation(records: list[Record], labels: list[int], own: dict[int, np.ndarray],
                        margin: float = MODEL_MARGIN) -> list[Estimate]:
    """Per label: the best method between and beyond the labelled slices, and the estimates
    (`margin`: MODEL_MARGIN; medgen_dev.bench.margin sweeps it)."""
    out = []
    for v in labels:
        count = sum(bool(np.any(t == v)) for t in own.values())
        mine = [r for r in records if r[0] == v]
        if not mine:
            why = ("one labelled slice: nothing to hold out" if count < 2 else
                   "no labelled slice could be hidden")
            hint = f"; {K1_HINT['segment']}" if count < 2 else ""
            out.append(Estimate(f"label {v}", "dice", K1_RULE["segment"], None, {}, count, 0,
                                {"between": "model", "beyond": "model"}, f"{why}; {K1_WHY['segment']}{hint}"))
            continue
        pooled = lambda m, region=None: sum((r[3] for r in mine if r[2] == m and region in (None, r[1])),
                                            np.zeros(3))
        interior = len({r[4] for r in mine if r[1] == "between"})
        if interior >= MIN_SPLIT_FOLDS:
            between = _best(SEGMENT_METHODS, lambda m: _dice(pooled(m, "between")), margin)
            beyond = _best(BEYOND_METHODS, lambda m: _dice(pooled(m, "beyond")), margin)
        else:
            between = beyond = _best(BEYOND_METHODS if interior else CARRY_METHODS, lambda m: _dice(pooled(m)), margin)
        composite = pooled(between, "between") + pooled(beyond, "beyond")
        chosen = between if between == beyond else f"{between} between, {beyond} beyond"
        note = "" if interior >= MIN_SPLIT_FOLDS else (
            "two labelled slices: between them, the method (model or registration) that best carried the structure from one "
            "to the other" if not interior else
            "one interior labelled slice: too little to choose a separate method between the "
            "labelled slices, so one method (best on all hidden slices) does the whole run")
        folds = len({r[4] for r in mine})
        loo = _dice(composite)
        out.append(Estimate(f"label {v}", "dice", chosen, _report_value(expected_dice(loo)),
                            {m: _report_value(_dice(pooled(m))) for m in SEGMENT_METHODS}, count,
                            folds, {"between": between, "beyond": beyond}, note, _report_value(loo)))
    return out


def _best(candidates: tuple[str, ...], score: Callable[[str], float], margin: float = MODEL_MARGIN) -> str:
    """The best-scoring candidate, or the model unless another beats it by `margin`."""
    scores = {m: score(m) for m in candidates}
    best = max(candidates, key=scores.__getitem__)
    return best if scores[best] > scores["model"] + margin else "model"


def assemble_segmentation(estimates: list[Estimate], labels: list[int], own: dict[int, np.ndarray],
                          answers: Callable[[str, int, tuple[str, ...]], np.ndarray], dtype) -> np.ndarray:
    """The output from each label's chosen parts: answers(method, label, parts) -> binary
    slices-first, valid at least in `parts` ("between" / "beyond" the labelled slices).

    Labels are written in order and a voxel keeps the first label that claims it; the labelled
    slices are copied exactly, as in the model's own output."""
    out = None
    for v, e in zip(labels, estimates):
        with_v = sorted(s for s, t in own.items() if np.any(t == v))
        same = e.parts["beyond"] == e.parts["between"]
        between = answers(e.parts["between"], v, ("between", "beyond") if same else ("between",))
        beyond = between if same else answers(e.parts["beyond"], v, ("beyond",))
        mask = beyond.copy()
        if len(with_v) >= 2:
            mask[with_v[0] + 1:with_v[-1]] = between[with_v[0] + 1:with_v[-1]]
        out = np.zeros(mask.shape, dtype) if out is None else out
        out[mask & (out == 0)] = v
    for s, t in own.items():
        out[s] = np.where(np.isin(t, labels), t, 0)
    return out


# -- image tasks ------------------------------------------------------------------------------------
def _tissue(e: Example, task: str) -> np.ndarray:
    """The voxels a fold is scored on and a synthesis map is fitted on: tissue (normalised
    intensity above prompts.TISSUE_LEVEL, the level the inpainting examples use) in the input or
    the target; for denoising in the clean target only, since noise covers the noisy input's
    background.

    Not the background's minimum: a resampled MR's background rings below zero (TCGA-DU-7294: -29
    to 0 around a zero background), which put the whole slice in the region; the background's
    share then decided the folds (the model, which flattens it, 4 dB ahead of NL-means on the
    folds while 0.84 dB behind it on the tissue the bench scores)."""
    y = e.image_norm(e.target) if task == "denoise" else e.target_norm(e.target)
    if task == "denoise":
        return y > TISSUE_LEVEL
    return (e.image_norm(e.image) > TISSUE_LEVEL) | (y > TISSUE_LEVEL)


def classical_method(task: str, name: str, examples: list[Example]) -> tuple[Callable, str]:
    """A classical candidate fitted on `examples`: (fn(slices [n,H,W] input units, holes) -> output
    units, a note of its tuned parameter). Parameters are tuned in the examples' intensity units,
    so they are applied in those units too."""
    if name == "biharmonic":
        return (lambda x, holes: np.stack([classical.biharmonic(s, m) for s, m in zip(x, holes)])), ""
    if task == "denoise":
        n = examples[0].image_norm
        xs, ys = [n(e.image) for e in examples], [n(e.target) for e in examples]
        if name == "nl-means":
            sigma = max(classical.noise_sigma(xs, ys), 1e-6)
            fn = lambda x, p: classical.nl_means(x, p, sigma)
            grid, what = classical.NLM_FACTORS, "h={:g} sigma"
        else:
            fn, grid, what = classical.tv, classical.TV_WEIGHTS, "weight={:g}"
        p = classical.pick_parameter(fn, grid, xs, ys)
        return (lambda x, holes: np.stack([n.inverse(fn(n(s), p)) for s in x])), what.format(p)
    fg = [_tissue(e, task) for e in examples]
    x_ex = np.concatenate([e.image[m] for e, m in zip(examples, fg)])
    y_ex = np.concatenate([e.target[m] for e, m in zip(examples, fg)])
    x_bg = min(float(e.image.min()) for e in examples)
    y_bg = min(float(e.target.min()) for e in examples)

    def apply(x: np.ndarray, holes) -> np.ndarray:
        on = x > x_bg
        out = np.full(x.shape, y_bg, np.float32)
        values = (classical.linear_map(x_ex, y_ex, x[on]) if name == "linear"
                  else classical.histogram_match(x[on], y_ex))
        out[on] = values
        return out
    return apply, ""


def check_image_task(task: str, examples: list[Example], model_fold: Callable, progress: Progress,
                     fitted: dict[str, tuple[Callable, str]]) -> dict[str, list[float]]:
    """Leave-one-out PSNR per candidate: {method: [PSNR per hidden pair]}.

    Denoising parameters are tuned once on all pairs (`fitted`, also what the run then uses):
    re-tuning per fold would cost k times the tuning (a grid of NL-means and TV runs over every
    pair, which dominated the check), for a one-of-five choice whose leak into the hidden pair's
    score is small. Synthesis maps are cheap and are refitted without the hidden pair."""

    scores: dict[str, list[float]] = {m: [] for m in IMAGE_METHODS[task]}
    if task == "denoise":
        fitted.update({m: classical_method(task, m, examples) for m in scores if m != "model"})
    folds = fold_slices(list(range(len(examples)))) if len(examples) > 1 else []
    for i, j in enumerate(folds):
        hidden, rest = examples[j], [e for k, e in enumerate(examples) if k != j]
        holes = (hidden.image != hidden.target)[None] if task == "inpaint" else None
        region = holes[0] if holes is not None else _tissue(hidden, task)
        if not region.any():
            continue
        for m in scores:
            if m == "model":
                pred = model_fold(hidden, rest, holes)
            else:
                fn = fitted[m][0] if m in fitted else classical_method(task, m, rest)[0]
                pred = fn(hidden.image[None].astype(np.float32), holes)[0]
            scores[m].append(_psnr_on(pred, hidden.target, region))
        progress((i + 1) / len(folds), f"self-check: hid example pair {j + 1} ({i + 1}/{len(folds)})")
    return scores


def fit_scores(task: str, examples: list[Example], fitted: dict[str, tuple[Callable, str]]) -> dict[str, float]:
    """Denoising from one example pair: each classical candidate's PSNR on the pair it was tuned on.

    Nothing can be held out, but NL-means and TV have one tuned parameter each, so the pair they
    were fitted on still ranks them; a fixed rule cannot, since which one wins depends on the
    noise and the image (bench rows run from one pair, `python -m medgen_dev.bench.k1 --images`,
    2026-12-03: TV 0.07 and 0.68 dB above NL-means on AURORA T1 at 5 and 10 % noise, 0.75 dB below
    it on lung2 CT). The model is not ranked this way: the pair is in its context, and from one
    pair it was 0.03-2.8 dB under NL-means on those rows, so it stays out."""
    if task != "denoise" or len(examples) != 1:
        return {}
    e = examples[0]
    region = _tissue(e, task)
    if not region.any():
        return {}
    return {m: _report_value(_psnr_on(fn(e.image[None].astype(np.float32), None)[0], e.target, region))
            for m, (fn, _) in fitted.items()}


def _psnr_on(pred: np.ndarray, target: np.ndarray, region: np.ndarray) -> float:
    """PSNR over `region`, on the target's range there (999 for an exact answer: JSON has no inf)."""
    from medgen.metrics import psnr

    ref = target.astype(np.float32)
    return min(psnr(pred[region], ref[region], float(ref[region].max() - ref[region].min()) or 1.0), 999.0)


def choose_image_task(task: str, scores: dict[str, list[float]], k: int,
                      fit: dict[str, float] | None = None, margin: float = IMAGE_MARGIN) -> Estimate:
    """The best method on the held-out pairs; a classical one replaces the model only when ahead by
    more than `margin` dB (IMAGE_MARGIN; medgen_dev.bench.image_margin sweeps it)."""
    if not any(scores.values()):
        why = "one example pair: nothing to hold out" if k < 2 else "no example pair could be scored"
        hint = f"; {K1_HINT['image']}" if k < 2 else ""
        if fit:
            best = max(fit, key=fit.get)
            on_pair = ", ".join(f"{m} {v:.2f} dB" for m, v in fit.items())
            return Estimate(task, "psnr", best, None, {}, k, 0, note=(
                f"{why}; {best} fitted the example pair best ({on_pair} on the pair it was tuned on: a ranking, "
                f"not an estimate); the model is left out, it trailed NL-means from one pair on the bench{hint}"))
        return Estimate(task, "psnr", K1_RULE[task], None, {}, k, 0, note=f"{why}; {K1_WHY[task]}{hint}")
    mean = {m: _report_value(float(np.mean(v))) for m, v in scores.items() if v}
    best = _best(tuple(mean), mean.get, margin) if "model" in mean else max(mean, key=mean.get)
    return Estimate(task, "psnr", best, mean[best], mean, k, len(next(iter(scores.values()))),
                    leave_one_out=mean[best])


def forced(task: str, method: str, names: list[str], k: int) -> list[Estimate]:
    """Report entries for a method the user forced: nothing is checked."""
    metric = "dice" if task == "segment" else "psnr"
    parts = {"between": method, "beyond": method} if task == "segment" else {}
    return [Estimate(n, metric, method, None, {}, k, 0, parts, "method chosen by the user: not checked")
            for n in names]


# -- one run: check, choose, answer ---------------------------------------------------------------
def _stop_if(cancel: Callable[[], bool] | None) -> None:
    """Classical methods do not poll the cancel flag themselves: ask before and after them."""
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user; nothing was written")


def latched(cancel: Callable[[], bool] | None) -> Callable[[], bool] | None:
    """`cancel`, asked by one thread at a time and answering True for good once it has: the
    self-check's folds run side by side, and a fold still running when another saw the request
    must stop at its next question without asking the user's flag again."""
    if cancel is None:
        return None
    lock, seen = threading.Lock(), []

    def ask() -> bool:
        with lock:
            if not seen and cancel():
                seen.append(True)
            return bool(seen)
    return ask


def _part(progress: Progress, a: float, b: float) -> Progress:
    return lambda f, msg: progress(a + (b - a) * f, msg)


def fold_context(model, device, image, examples: list[Example], options, reg_norm: Callable,
                 fields: classical.FieldCache, cancel: Callable[[], bool] | None = None) -> SegmentContext:
    """What the folds of a propagation run need: its slices, examples and the model's batched folds."""
    from medgen.core.config import modality_index, task_index
    from medgen.core.intensity import fit_normalizer
    from medgen.core.volume import slice_view
    from medgen.infer.predictor import Predictor
    from medgen.infer.segment import VolumeSegmenter, propagate_together
    from medgen.prompts import example_labels

    axis, labels = options.axis, example_labels(examples)
    own = {e.slice_index: e.target for e in examples if e.slice_index is not None}
    spacing = image.slice_spacing(axis)
    predictor = Predictor(model, device, cancel)
    norm = fit_normalizer(image.array, options.modality)
    # folds score how well each method carries the structure over a gap, so no open end is
    # capped there (the hidden outermost slice lies a whole gap out, farther than the run's
    # reach, and every capped candidate would score 0); the run itself keeps the caps
    settings = replace(options.segment, mode="propagate", extent=(FOLD_REACH, FOLD_REACH), profile_stop=False)
    dense = {v: "distance" for v in labels if sum(bool(np.any(t == v)) for t in own.values()) >= interpolate.DENSE}

    def model_folds(folds: list[tuple[np.ndarray, list[Example], int]]) -> list[np.ndarray]:
        return propagate_together([
            VolumeSegmenter(predictor, stack, spacing=spacing, norm=norm, examples=fold_examples,
                            labels=labels, task=task_index("segment"), modality=modality_index(options.modality),
                            in_volume=True, settings=settings, progress=lambda f, m: None,
                            thickness=image.slice_thickness(axis), fill_backends=dense, stop_at=hidden)
            for stack, fold_examples, hidden in folds])
    return SegmentContext(slice_view(image.array, axis), examples, labels, model_folds, reg_norm, spacing,
                          options.segment.threshold, cancel or (lambda: False), fields)


def run_segmentation(model, device, image, examples: list[Example], options, mode: str,
                     model_answer: Callable[..., np.ndarray], progress: Progress,
                     cancel: Callable[[], bool] | None = None, model_fold: Callable | None = None,
                     threads: int = 1) -> tuple[np.ndarray, SelfCheckReport]:
    """The segmentation (image axis order) by `options.method`, and its report.

    `model_answer(progress, parts=None)` is the model's own output (the pipeline's path, adaptation
    included), limited to `parts` (label value -> regions) when given; it is only called when some
    label's chosen method is the model, and only for the regions where it is. Slice by slice
    (`mode` "independent") slicewise.py decides instead, with `model_fold(hidden pair, the others)`
    (the model's label map of a hidden example pair) and `threads` for the pixel classifier."""
    from medgen.core.intensity import fit_normalizer
    from medgen.core.volume import slice_view
    from medgen.infer.segment import label_dtype
    from medgen.prompts import example_labels

    method, axis = options.method, options.axis
    cancel = latched(cancel)  # the folds ask it from several threads
    labels = example_labels(examples)
    own = {e.slice_index: e.target for e in examples if e.slice_index is not None}
    if mode != "propagate":
        from medgen.infer import slicewise

        return slicewise.run(image, examples, options, model_answer, model_fold, progress, threads, cancel)
    if method == "classifier":
        raise InputError("the pixel classifier segments each slice on its own from the example pairs, not by "
                         "propagation: use the independent segmentation mode with it")
    slices = slice_view(image.array, axis)
    spacing = image.slice_spacing(axis)
    reg_norm = fit_normalizer(image.array, options.modality, clip=True)
    t0 = time.perf_counter()
    fields = classical.FieldCache()
    if method == "auto":
        ctx = fold_context(model, device, image, examples, options, reg_norm, fields, cancel)
        estimates = choose_segmentation(check_segmentation(ctx, _part(progress, 0.0, 0.5)), labels, own)
    else:
        estimates = forced("segment", method, [f"label {v}" for v in labels], len(own))
    t1 = time.perf_counter()
    rest = _part(progress, 0.5 if method == "auto" else 0.0, 1.0)
    cache: dict[str, np.ndarray] = {}

    def answer(m: str, v: int, parts: tuple[str, ...]) -> np.ndarray:
        with_v = sorted(s for s, t in own.items() if np.any(t == v))
        mine = {s: own[s] == v for s in with_v}
        geometry = (spacing, image.slice_thickness(axis), options.segment.extent)
        stop = lambda mask: cap_open_ends(mask, mine, *geometry)
        if m == "model":
            if "model" not in cache:  # one run for every label's model regions
                wanted = {u: tuple(r for r, x in e.parts.items() if x == "model") for u, e in zip(labels, estimates)}
                cache["model"] = np.moveaxis(model_answer(rest, wanted), axis, 0)
            return cache["model"] == v
        if m == "nearest":
            idx = sorted(own)
            full = np.zeros(slices.shape, bool)
            for s in idx:
                full[s] = own[s] == v
            return stop(classical.nearest_copy(full, idx))
        if not with_v:
            return np.zeros(slices.shape, bool)
        if m == "registration":
            return stop(classical.registration_propagate(reg_norm(slices), mine, spacing, parts=parts,
                                                         fields=fields, reach=max(segment.end_reaches(mine, *geometry)),
                                                         tissue_stop=True, max_side=REG_MAX_SIDE,
                                                         iterations=REG_ITERATIONS, refine=REG_REFINE))
        stack = np.zeros(slices.shape, bool)
        for s in with_v:
            stack[s] = own[s] == v
        return interpolate.fill_between_slices(stack, with_v) if len(with_v) >= 2 else stack

    if all(set(e.parts.values()) == {"model"} for e in estimates):
        out = np.moveaxis(model_answer(rest), axis, 0)
    else:
        _stop_if(cancel)
        out = assemble_segmentation(estimates, labels, own, answer, label_dtype(labels))
        _stop_if(cancel)
    rest(1.0, "done")
    report = SelfCheckReport("segment", method, estimates, t1 - t0, time.perf_counter() - t1)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis)), report


def run_image_task(model, device, image, examples: list[Example], options, mask,
                   model_answer: Callable[[Progress], tuple[np.ndarray, float | None]], progress: Progress,
                   cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, SelfCheckReport]:
    """Denoising, synthesis or inpainting (image axis order) by `options.method`, and its report."""
    from medgen.core.config import modality_index, task_index
    from medgen.core.volume import slice_view
    from medgen.infer import imagetasks
    from medgen.infer.predictor import Predictor

    task, method = options.task, options.method
    t0 = time.perf_counter()
    fitted: dict[str, tuple[Callable, str]] = {}
    if method == "auto":
        predictor = Predictor(model, device, cancel)

        def model_fold(hidden: Example, rest: list[Example], holes) -> np.ndarray:
            out_norm = rest[0].target_norm if task == "synthesize" else hidden.image_norm
            return imagetasks.run_image_task(predictor, hidden.image[None].astype(np.float32), rest,
                                             task_index(task), modality_index(options.modality),
                                             hidden.image_norm, out_norm, holes, lambda f, m: None)[0][0]
        scores = check_image_task(task, examples, model_fold, _part(progress, 0.0, 0.5), fitted)
        estimate = choose_image_task(task, scores, len(examples), fit_scores(task, examples, fitted))
    else:
        estimate = forced(task, method, [task], len(examples))[0]
    t1 = time.perf_counter()
    rest = _part(progress, 0.5 if method == "auto" else 0.0, 1.0)
    if estimate.chosen == "model":
        array, strength = model_answer(rest)
        if strength is not None:
            estimate.note = (estimate.note + "; " if estimate.note else "") + (
                f"the model kept {strength:.0%} of its correction to its classical start (fitted on the examples)")
    else:
        fn, parameter = fitted.get(estimate.chosen) or classical_method(task, estimate.chosen, examples)
        if parameter:
            estimate.note = (estimate.note + "; " if estimate.note else "") + f"tuned on the examples: {parameter}"
        slices = slice_view(image.array, options.axis).astype(np.float32)
        holes = slice_view(mask.array != 0, options.axis) if task == "inpaint" else np.zeros(slices.shape, bool)
        _stop_if(cancel)
        out = fn(slices, holes)
        _stop_if(cancel)
        if task == "inpaint":
            out = np.where(holes, out, slices)
        array = np.ascontiguousarray(np.moveaxis(out.astype(np.float32), 0, options.axis))
    rest(1.0, "done")
    return array, SelfCheckReport(task, method, [estimate], t1 - t0, time.perf_counter() - t1)
