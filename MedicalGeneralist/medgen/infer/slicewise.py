"""Slice-by-slice segmentation from other images' example pairs: the model or a pixel classifier
per label, chosen by leave-one-out over the pairs, and the estimate the user gets with it.

Propagation's self-check (selfcheck.py) hides labelled slices of the volume itself. Here the
examples are pairs from other images (cross-subject, or slices handed over as other images), so a
hidden pair is a query like the user's: the other pairs are its context and its target the answer.
Both candidates are run on it as the run runs them (the model with its test-time adaptation on the
remaining pairs, the forest fitted on them), and the Dice pooled over the hidden pairs is reported
as the estimate itself. Propagation maps its raw score (its hidden slice lies across twice the
user's gap); no such distance separates a hidden pair from its context, but where the pairs come
from one image and the query from another subject the estimate errs on the optimistic side.

Why a second method at all: the network may recognise the domain instead of reading its examples
(it follows them less where two targets look alike to it, bench's ambiguity test), while the
classifier (classical.fit_pixel_classifier) reads nothing else. Each wins elsewhere; the
classifier replaces the model only when ahead by more than selfcheck.MODEL_MARGIN, as the
classical methods of propagation do. With the image's own labelled slices in this mode the model
runs alone: its folds would not be the run (it crops around the structure's position there).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from medgen.core.errors import InputError
from medgen.infer import classical
from medgen.infer.selfcheck import (Estimate, Progress, SelfCheckReport, _best, _counts, _dice,
                                    _part, _report_value, _stop_if, assemble_segmentation, fold_slices, forced)
from medgen.prompts import Example, example_labels

METHODS = ("model", "classifier")
# example pairs hidden in turn (spread over the list): each costs a fine-tuning of the model and a
# forest fit, and with 5 the check from 8 BUSI pairs took 250-354 s on one busy core (the model alone
# 11 s); 3 is what the bench's ambiguity cases have (k = 3), so its figures are those of this setting
FOLDS = 3
ModelFold = Callable[[Example, list[Example]], np.ndarray]  # (hidden pair, the others) -> its label map
NOTE = "examples from other images: each of {folds} hidden example pairs predicted from the others"
ONE_PAIR = ("one example pair shows it: nothing to hold out, so the model runs; give a second example pair "
            "for an estimate and a choice of method")


class Features(dict):
    """Pixel features per example pair, computed once for all folds and labels."""

    def of(self, e: Example) -> np.ndarray:
        if id(e) not in self:
            self[id(e)] = classical.pixel_features(e.image_norm(e.image))
        return self[id(e)]


def run(image, examples: list[Example], options, model_answer: Callable[[Progress], np.ndarray],
        model_fold: ModelFold, progress: Progress, threads: int,
        cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, SelfCheckReport]:
    """The segmentation (image axis order) by `options.method`, and its report."""
    method, labels = options.method, example_labels(examples)
    own = any(e.slice_index is not None for e in examples)
    if method not in ("auto",) + METHODS:
        raise InputError(f"the {method} method propagates from labelled slices of the image itself, " + (
            "which slice-by-slice mode does not: use the propagation (or automatic) mode for it" if own else
            "and none of the examples is one: label a slice of this image") + ", or use the model or the classifier")
    t0 = time.perf_counter()
    features = Features()
    if method != "auto":
        estimates = forced("segment", method, [f"label {v}" for v in labels], len(examples))
    elif own:
        note = "labelled slices of this image, slice by slice: only the model applies"
        estimates = [Estimate(f"label {v}", "dice", "model", None, {}, len(examples), 0,
                              {"between": "model", "beyond": "model"}, note) for v in labels]
    else:
        estimates = check(examples, labels, model_fold, features, _part(progress, 0.0, 0.5), options.seed,
                          threads, cancel)
    t1 = time.perf_counter()
    rest = _part(progress, 0.5 if method == "auto" and not own else 0.0, 1.0)
    out = answer(image, examples, labels, estimates, options, model_answer, features, rest, threads, cancel)
    rest(1.0, "done")
    report = SelfCheckReport("segment", method, estimates, t1 - t0, time.perf_counter() - t1)
    return np.ascontiguousarray(np.moveaxis(out, 0, options.axis)), report


def check(examples: list[Example], labels: list[int], model_fold: ModelFold, features: Features,
          progress: Progress, seed: int = 0, threads: int = 1,
          cancel: Callable[[], bool] | None = None) -> list[Estimate]:
    """Per label: the model's and the classifier's Dice pooled over the hidden pairs, and the choice."""
    folds = fold_slices(list(range(len(examples))), FOLDS) if len(examples) > 1 else []
    counts = {(v, m): np.zeros(3) for v in labels for m in METHODS}
    scored = dict.fromkeys(labels, 0)
    for i, j in enumerate(folds):
        _stop_if(cancel)
        hidden, others = examples[j], examples[:j] + examples[j + 1:]
        shown = [v for v in labels if any(np.any(e.target == v) for e in others)]
        if not shown:
            continue
        predicted = model_fold(hidden, others)
        for v in shown:
            truth = hidden.target == v
            forest = classical.fit_pixel_classifier([features.of(e) for e in others],
                                                    [e.target == v for e in others], seed, threads)
            counts[v, "model"] += _counts(predicted == v, truth)
            counts[v, "classifier"] += _counts(classical.predict_pixels(forest, features.of(hidden)), truth)
            scored[v] += 1
        progress((i + 1) / len(folds), f"self-check: hid example pair {j + 1} ({i + 1}/{len(folds)})")
    out = []
    for v in labels:
        count = sum(bool(np.any(e.target == v)) for e in examples)
        # a label that no hidden pair shows has nothing to score against (Dice of two empties)
        if not scored[v] or not counts[v, "model"][2]:
            out.append(Estimate(f"label {v}", "dice", "model", None, {}, count, 0,
                                {"between": "model", "beyond": "model"}, ONE_PAIR))
            continue
        scores = {m: _dice(counts[v, m]) for m in METHODS}
        best = _best(METHODS, scores.__getitem__)
        out.append(Estimate(f"label {v}", "dice", best, _report_value(scores[best]),
                            {m: _report_value(s) for m, s in scores.items()}, count, scored[v],
                            {"between": best, "beyond": best}, NOTE.format(folds=scored[v]),
                            _report_value(scores[best])))
    return out


def answer(image, examples: list[Example], labels: list[int], estimates: list[Estimate], options,
           model_answer: Callable[[Progress], np.ndarray], features: Features, progress: Progress,
           threads: int = 1, cancel: Callable[[], bool] | None = None) -> np.ndarray:
    """Slices-first output from each label's chosen method (the model runs once for all its labels)."""
    from medgen.core.intensity import fit_normalizer
    from medgen.core.volume import slice_view
    from medgen.infer.segment import label_dtype

    chosen = {v: e.chosen for v, e in zip(labels, estimates)}
    slices = slice_view(image.array, options.axis)
    forests = {v: classical.fit_pixel_classifier([features.of(e) for e in examples],
                                                 [e.target == v for e in examples], options.seed, threads)
               for v, m in chosen.items() if m == "classifier"}
    split = 0.5 if forests and "model" in chosen.values() else (0.0 if forests else 1.0)
    model = (np.moveaxis(model_answer(_part(progress, 0.0, split)), options.axis, 0)
             if "model" in chosen.values() else None)
    pixels = {v: np.zeros(slices.shape, bool) for v in forests}
    if forests:
        norm = fit_normalizer(image.array, options.modality)
        for s in range(slices.shape[0]):
            _stop_if(cancel)
            f = classical.pixel_features(norm(slices[s]))
            for v, forest in forests.items():
                pixels[v][s] = classical.predict_pixels(forest, f)
            progress(split + (1 - split) * (s + 1) / slices.shape[0], f"pixel classifier: slice {s + 1}")
    own = {e.slice_index: e.target for e in examples if e.slice_index is not None}
    return assemble_segmentation(estimates, labels, own,
                                 lambda m, v, parts: pixels[v] if m == "classifier" else model == v,
                                 label_dtype(labels))
