"""The self-check's IMAGE_MARGIN: how far (dB) a classical method must beat the model on the held-out
example pairs before it replaces it, chosen on image cases the bench does not score.

Runs the bench's image-task section on a configuration (default Resources/Bench/image_calibration.json:
18 cases), which records per case the self-check's leave-one-out PSNR of every candidate and each
method's PSNR on the scored slices, then for each margin picks as auto would and prints auto's PSNR
behind the best method per case. A classical pick is scored by the bench's baseline of that method
(fitted on the same pairs; within 0.03 dB of auto's own run of it on the bench's rows).

    python -m medgen_dev.bench.image_margin [--config FILE] [--margins 0,0.1,0.2] [--results results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from medgen.infer import selfcheck
from medgen_dev.bench.data import REPO_ROOT, load_config

CONFIG = REPO_ROOT / "Resources" / "Bench" / "image_calibration.json"
MARGINS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
# the bench's column for each self-check candidate (its columns name the tuned parameter after these)
COLUMNS = {"model": "ours", "nl-means": "NL-means", "tv": "TV Chambolle", "linear": "linear intensity map",
           "histogram": "histogram matching", "biharmonic": "biharmonic"}


def psnr_of(row: dict, method: str) -> float:
    """The PSNR a bench row recorded for a self-check candidate."""
    return next(v["psnr"] for k, v in row["methods"].items() if k.startswith(COLUMNS[method]))


def behind_best(rows: list[dict], margin: float) -> list[tuple[str, str, float]]:
    """Per row with folds: (case, auto's pick at `margin`, its PSNR minus the best candidate's)."""
    out = []
    for row in rows:
        folds = {m: [v] for m, v in row["auto"]["candidates"].items()}
        if not folds:
            continue
        pick = selfcheck.choose_image_task(row["task"], folds, 2, margin=margin).chosen
        out.append((row["case"], pick, psnr_of(row, pick) - max(psnr_of(row, m) for m in folds)))
    return out


def table(rows: list[dict], margins: tuple[float, ...]) -> str:
    lines = ["| margin (dB) | mean auto − best (dB) | worst row | rows > 0.2 dB behind | classical picks |",
             "|---|---|---|---|---|"]
    for m in margins:
        res = behind_best(rows, m)
        d = np.array([r[2] for r in res])
        worst = res[int(np.argmin(d))]
        lines.append(f"| {m:g}{' (shipped)' if m == selfcheck.IMAGE_MARGIN else ''} | {d.mean():+.3f} | "
                     f"{worst[2]:+.2f} ({worst[0]}) | {int((d < -0.2).sum())} | "
                     f"{sum(r[1] != 'model' for r in res)} of {len(res)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from medgen_dev.bench.runner import image_tasks
    from medgen.io.weights import load_model

    ap = argparse.ArgumentParser(prog="python -m medgen_dev.bench.image_margin", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--margins", default=",".join(f"{m:g}" for m in MARGINS))
    ap.add_argument("--results", help="a bench results.json to read the rows from instead of running them")
    args = ap.parse_args(argv)
    margins = tuple(float(m) for m in args.margins.split(","))
    if args.results:
        rows = json.loads(Path(args.results).read_text())["image_tasks"]["rows"]
    else:
        model, _ = load_model(None, device="cpu")
        rows = image_tasks(model, load_config(args.config), args.device, print)[0]["rows"]
    for case, pick, d in behind_best(rows, selfcheck.IMAGE_MARGIN):
        print(f"{case:40s} {pick:10s} {d:+.2f} dB")
    print(table(rows, margins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
