"""The self-check's MODEL_MARGIN: how much another method must beat the model on the hidden
labelled slices before it replaces the model, chosen on structures the bench does not score.

Per structure and k (k >= 2) this runs the self-check's folds once and every segmentation method
once on the whole volume (`--method model|fill|registration|nearest`, as users can force them),
then, for each margin, assembles the output auto would give (selfcheck.choose_segmentation and
assemble_segmentation on those outputs) and scores it on the unlabelled slices. The table is the
mean Dice per margin and k; the margin with the best mean is the one to ship.

    python -m medgen_dev.bench.margin [--config FILE] [--margins 0,0.01,0.02]   (default: Resources/Bench/calibration.json)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np

from medgen.infer import classical, selfcheck
from medgen.infer.pipeline import RunOptions, run
from medgen.metrics import dice
from medgen_dev.bench.calibrate import CONFIG, runs
from medgen_dev.bench.data import load_config

MARGINS = (0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05)


def auto_at(records: list, own: dict[int, np.ndarray], outputs: dict[str, np.ndarray],
            margin: float) -> tuple[np.ndarray, str]:
    """Auto's binary output (slices-first) with `margin`, from every method's whole-volume output."""
    (est,) = selfcheck.choose_segmentation(records, [1], own, margin)
    out = selfcheck.assemble_segmentation([est], [1], own, lambda m, v, parts: outputs[m], np.uint8)
    return out > 0, est.chosen


def sweep(model, cfg, device: str, margins: tuple[float, ...]) -> list[dict]:
    """Per structure and k >= 2: auto's Dice (and choice) at every margin."""
    rows = []
    for s, image, axis, truth, given, examples in runs(cfg):
        if len(given) < 2:
            continue
        outputs, records = _methods(model, image, examples, RunOptions("segment", axis, s.modality, device))
        own = {g: truth[g].astype(np.uint8) for g in given}
        rest = np.setdiff1d(np.arange(truth.shape[0]), given)
        row = {"structure": s.name, "k": len(given)}
        for m in margins:
            out, chosen = auto_at(records, own, outputs, m)
            row[m] = (dice(out[rest], truth[rest]), chosen)
        rows.append(row)
        print(f"{s.name:32s} k={len(given)} " + "  ".join(f"{m:g}: {row[m][0]:.3f} {row[m][1]}" for m in margins[::2]),
              flush=True)
    return rows


def _methods(model, image, examples, options) -> tuple[dict[str, np.ndarray], list]:
    """Every segmentation method's whole-volume output (slices-first) and the self-check's fold records."""
    from medgen.core.device import resolve_device
    from medgen.core.intensity import fit_normalizer

    ctx = selfcheck.fold_context(model, resolve_device(options.device), image, examples, options,
                                 fit_normalizer(image.array, options.modality, clip=True), classical.FieldCache())
    records = selfcheck.check_segmentation(ctx, lambda f, m: None)
    outputs = {m: np.moveaxis(run(model, image, examples, replace(options, method=m)).array, options.axis, 0) > 0
               for m in selfcheck.SEGMENT_METHODS}
    return outputs, records


def table(rows: list[dict], margins: tuple[float, ...]) -> str:
    """Mean Dice per margin, over all rows and per k."""
    ks = sorted({r["k"] for r in rows})
    lines = ["| margin | mean Dice | " + " | ".join(f"k = {k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    for m in margins:
        per_k = [np.mean([r[m][0] for r in rows if r["k"] == k]) for k in ks]
        lines.append(f"| {m:g}{' (shipped)' if m == selfcheck.MODEL_MARGIN else ''} | "
                     f"{np.mean([r[m][0] for r in rows]):.4f} | " + " | ".join(f"{v:.4f}" for v in per_k) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from medgen.io.weights import load_model

    ap = argparse.ArgumentParser(prog="python -m medgen_dev.bench.margin", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--margins", default=",".join(f"{m:g}" for m in MARGINS))
    args = ap.parse_args(argv)
    margins = tuple(float(m) for m in args.margins.split(","))
    model, _ = load_model(None, device="cpu")
    print(table(sweep(model, load_config(args.config), args.device, margins), margins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
