"""Fit the self-check's expected-Dice map: leave-one-out Dice -> the Dice the run will get.

The self-check's leave-one-out Dice is pessimistic by construction: a hidden slice is predicted
across twice the user's gap (or a whole gap past the outermost labelled slice), while the run's
slices lie at most half a gap from a labelled one. On the bench it read 0.18 below the Dice auto
got (30 rows). This command runs auto, as users get it, on structures that are *not* rows of the
bench (Resources/Bench/calibration.json: other organs and brain structures of the same volumes),
and fits actual ~ a + b * leave-one-out by least squares; the runtime applies it
(`selfcheck.EXPECTED_DICE`) and the bench's calibration table then scores it on its own rows.

    python -m medgen_dev.bench.calibrate [--config FILE] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medgen.infer.pipeline import RunOptions
from medgen.prompts import pairs_from_volumes
from medgen_dev.bench.data import load_config, load_structure, spread_slices
from medgen_dev.bench.runner import _auto

CONFIG = Path(__file__).resolve().parents[3] / "Resources" / "Bench" / "calibration.json"


def runs(cfg) -> Iterator[tuple]:
    """(structure, image, numpy axis, truth slices-first, labelled slices, examples) per structure
    and k of the configuration, where the structure spans at least k + 2 slices."""
    for s in cfg.structures:
        image, label, axis = load_structure(s)
        truth = np.moveaxis(label.array, axis, 0) > 0
        present = np.nonzero(truth.any((1, 2)))[0]
        for k in cfg.propagation_k:
            if k + 2 <= len(present):
                given = spread_slices(present, k, np.random.default_rng([cfg.seed, k]))
                yield s, image, axis, truth, given, pairs_from_volumes(image, label, axis, given, "segment",
                                                                       s.modality, own=True)


def collect(model, cfg, device: str) -> list[dict]:
    """One record per structure and k: auto's leave-one-out estimate and the Dice it got."""
    records = []
    for s, image, axis, truth, given, examples in runs(cfg):
        auto, check = _auto(model, image, examples, RunOptions("segment", axis, s.modality, device))
        rest = np.setdiff1d(np.arange(truth.shape[0]), given)
        pred = np.moveaxis(auto, axis, 0)[rest] > 0
        actual = float(2 * (pred & truth[rest]).sum() / max(pred.sum() + truth[rest].sum(), 1))
        records.append({"structure": s.name, "k": len(given), "given": given, "chosen": check["chosen"],
                        "loo": check["loo"], "actual": actual})
        print(f"{s.name:32s} k={len(given)} {check['chosen']:38s} loo "
              f"{'  -  ' if check['loo'] is None else format(check['loo'], '.3f')} actual {actual:.3f}",
              flush=True)
    return records


def fit(records: list[dict]) -> dict:
    """Least squares actual ~ a + b * loo, its in-sample error and its error on each structure
    when that structure is left out of the fit (what a new structure can expect)."""
    rows = [r for r in records if r["loo"] is not None]
    x, y = np.array([r["loo"] for r in rows]), np.array([r["actual"] for r in rows])
    b, a = np.polyfit(x, y, 1)
    names = np.array([r["structure"] for r in rows])
    held = np.empty_like(y)
    for n in set(names):
        out = names == n
        bb, aa = np.polyfit(x[~out], y[~out], 1)
        held[out] = np.clip(aa + bb * x[out], 0, 1)
    return {"a": float(a), "b": float(b), "n": len(rows), "structures": len(set(names)),
            "mae_raw": float(np.mean(np.abs(x - y))), "bias_raw": float(np.mean(x - y)),
            "mae_fitted": float(np.mean(np.abs(np.clip(a + b * x, 0, 1) - y))),
            "mae_structure_left_out": float(np.mean(np.abs(held - y))), "r": float(np.corrcoef(x, y)[0, 1])}


def main(argv: list[str] | None = None) -> int:
    from medgen.io.weights import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--out", default="calibration_fit.json")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    model = load_model(None)[0]
    records = collect(model, load_config(args.config), args.device)
    result = fit(records)
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps({"fit": result, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
