"""The self-check's rule for one labelled slice: the model against registration as auto runs it.

With one labelled slice nothing can be held out, so a rule picks the method (selfcheck.K1_RULE).
The bench's registration baseline carries the mask to the volume's edges; auto's registration
stops its open ends by the model's reach and the tissue under the mask, which makes it another
method. This command runs both, as `medgen run --method model|registration` would, from the slice
the bench's k = 1 rows label, on a bench configuration's structures, and prints a table.

    python -m medgen_dev.bench.k1 [--config FILE] [--extents 3,6]   (default: Resources/Bench/calibration.json)

`--extents` adds the model with its open ends reaching that many equivalent radii instead of
SegmentSettings.extent's 1.5 (the reach rule that stops a structure past its end, which also stops
long ones such as the aorta early).

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
from medgen.infer.segment import SegmentSettings
from medgen.metrics import dice
from medgen.prompts import pairs_from_volumes
from medgen_dev.bench.calibrate import CONFIG
from medgen_dev.bench.data import load_config, load_structure, spread_slices

METHODS = ("model", "registration")


def one_slice_dice(model, cfg, device: str, extents: tuple[float, ...] = ()) -> list[dict]:
    """Per structure: each method's Dice on every slice but the labelled one."""
    several = SegmentSettings.extent[1]
    runs = {m: {"method": m} for m in METHODS}
    runs.update({f"model, reach {e:g} radii": {"method": "model", "segment": SegmentSettings(extent=(e, several))}
                 for e in extents})
    rows = []
    for s in cfg.structures:
        image, label, axis = load_structure(s)
        truth = np.moveaxis(label.array, axis, 0) > 0
        given = spread_slices(np.nonzero(truth.any((1, 2)))[0], 1, np.random.default_rng([cfg.seed, 1]))
        examples = pairs_from_volumes(image, label, axis, given, "segment", s.modality, own=True)
        rest = np.setdiff1d(np.arange(truth.shape[0]), given)
        row = {"structure": s.name}
        for name, how in runs.items():
            out = run(model, image, examples, RunOptions("segment", axis, s.modality, device, **how))
            row[name] = dice(np.moveaxis(out.array, axis, 0)[rest] > 0, truth[rest])
        rows.append(row)
        print(f"{s.name:32s} " + "  ".join(f"{m} {row[m]:.3f}" for m in runs), flush=True)
    return rows


def table(rows: list[dict], margin: float = 0.01) -> str:
    """Each method's mean, and the rows where it is ahead of / behind the model (the rule) by more
    than `margin` (closer is a tie)."""
    names = [m for m in rows[0] if m != "structure"]
    count = lambda keep: f"{sum(keep(r) for r in rows)} of {len(rows)}"
    lines = ["| method | mean Dice | rows ahead of the model by > 0.01 | rows behind it by > 0.01 |", "|---|---|---|---|"]
    for m in names:
        mean = np.mean([r[m] for r in rows])
        if m == "model":
            lines.append(f"| model | {mean:.3f} | – | – |")
        else:
            lines.append(f"| {m} | {mean:.3f} | {count(lambda r: r[m] > r['model'] + margin)} | "
                         f"{count(lambda r: r[m] < r['model'] - margin)} |")
    return "\n".join(lines)


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
    ap.add_argument("--extents", default="", help="comma-separated reaches (radii) to run the model with besides 1.5")
    args = ap.parse_args(argv)
    model, _ = load_model(args.model, device="cpu")
    if args.images:
        print(image_table(one_pair_psnr(model, load_config(args.config), args.device)))
        return 0
    extents = tuple(float(e) for e in args.extents.split(",") if e)
    print(table(one_slice_dice(model, load_config(args.config or CONFIG), args.device, extents)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
