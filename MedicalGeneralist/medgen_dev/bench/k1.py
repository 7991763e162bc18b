"""The self-check's rule for one labelled slice: the model against registration as auto runs it.

With one labelled slice nothing can be held out, so a rule picks the method (selfcheck.K1_RULE).
The bench's registration baseline carries the mask to the volume's edges; auto's registration
stops its open ends by the model's reach and the tissue under the mask, which makes it another
method. This command runs both, as `medgen run --method model|registration` would, from the slice
the bench's k = 1 rows label, on a bench configuration's structures, and prints a table.

    python -m medgen_dev.bench.k1 [--config FILE]   (default: Resources/Bench/calibration.json)

With `--images` it runs a configuration's image tasks (the bench's: Resources/Bench/shared_data.json)
from one example pair instead: the model, the run as auto gives it (K1_RULE, or for denoising
the tuned classical method that fits the pair best) and the classical baselines, PSNR per case.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np

from medgen.infer.pipeline import RunOptions, run
from medgen.metrics import dice
from medgen.prompts import pairs_from_volumes
from medgen_dev.bench.calibrate import CONFIG
from medgen_dev.bench.data import load_config, load_structure, spread_slices

METHODS = ("model", "registration")


def one_slice_dice(model, cfg, device: str) -> list[dict]:
    """Per structure: each method's Dice on every slice but the labelled one."""
    rows = []
    for s in cfg.structures:
        image, label, axis = load_structure(s)
        truth = np.moveaxis(label.array, axis, 0) > 0
        given = spread_slices(np.nonzero(truth.any((1, 2)))[0], 1, np.random.default_rng([cfg.seed, 1]))
        examples = pairs_from_volumes(image, label, axis, given, "segment", s.modality, own=True)
        rest = np.setdiff1d(np.arange(truth.shape[0]), given)
        row = {"structure": s.name}
        for m in METHODS:
            out = run(model, image, examples, RunOptions("segment", axis, s.modality, device, method=m))
            row[m] = dice(np.moveaxis(out.array, axis, 0)[rest] > 0, truth[rest])
        rows.append(row)
        print(f"{s.name:32s} " + "  ".join(f"{m} {row[m]:.3f}" for m in METHODS), flush=True)
    return rows


def table(rows: list[dict], margin: float = 0.01) -> str:
    mean = {m: np.mean([r[m] for r in rows]) for m in METHODS}
    won = lambda a, b: sum(r[a] > r[b] + margin for r in rows)
    lines = [f"| {m} | {mean[m]:.3f} | {won(m, o)} of {len(rows)} |" for m, o in zip(METHODS, METHODS[::-1])]
    return "\n".join(["| method | mean Dice | rows ahead by > 0.01 |", "|---|---|---|"] + lines)


def one_pair_psnr(model, cfg, device: str) -> list[dict]:
    """Per image case: every method's PSNR from one example pair (the bench's image rows)."""
    from medgen_dev.bench.runner import image_tasks

    rows = image_tasks(model, replace(cfg, image_examples=1), device, lambda m: print(m, flush=True))[0]["rows"]
    return [{"case": r["case"], "task": r["task"], **{m: v["psnr"] for m, v in r["methods"].items()}} for r in rows]


def image_table(rows: list[dict]) -> str:
    """Model, the one-pair rule (auto) and the best other method, per case."""
    lines = ["| case | model | auto | best other method |", "|---|---|---|---|"]
    for r in rows:
        others = {m: v for m, v in r.items() if m not in ("case", "task", "ours", "auto", "noisy input")}
        best = max(others, key=others.get)
        lines.append(f"| {r['case']} | {r['ours']:.2f} | {r['auto']:.2f} | {best} {others[best]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from medgen.io.weights import load_model

    ap = argparse.ArgumentParser(prog="python -m medgen_dev.bench.k1", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help=f"default: {CONFIG.name}, with --images the bench's")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", action="store_true", help="image tasks from one example pair")
    ap.add_argument("--model", default=None, help="model id, folder or safetensors file (default: the default)")
    args = ap.parse_args(argv)
    model, _ = load_model(args.model, device="cpu")
    if args.images:
        print(image_table(one_pair_psnr(model, load_config(args.config), args.device)))
        return 0
    print(table(one_slice_dice(model, load_config(args.config or CONFIG), args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
