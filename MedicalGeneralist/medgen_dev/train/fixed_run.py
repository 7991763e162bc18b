"""A fixed-length training run from the current default checkpoint, everything in one folder.

For a session that is lent a GPU for a few minutes: `python -m medgen_dev.train.fixed_run
--steps 4000 --minutes 8 --out runs/gpu-1 [--task-weights '{"twins3d": 0.12}']` continues the
shipped model with the shipped training recipe (Models/<default>/train.json, episodes.py's task
mix, changed by --task-weights) and leaves model.safetensors,
config.json, log.csv, val.csv, curves.png and run.json (device, steps, wall time) in --out. On a
CPU-only machine the same command trains on the CPU with a smaller batch, so the script is tested
where CI runs. A run cut off by --minutes keeps its last checkpoint; rerunning resumes it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medgen.io.weights import load_registry, resources_root
from medgen_dev.train.trainer import TrainConfig, train


def shipped_recipe() -> tuple[dict, Path]:
    """The default model's training config and weights, as shipped, with the model fields of its
    config.json: the default runs with inputs (denoise_inputs) its train.json predates, and a
    continuation must train on the inputs the model is run with."""
    folder = resources_root() / "Models" / load_registry()["default"]
    recipe = json.loads((folder / "train.json").read_text())
    shipped = json.loads((folder / "config.json").read_text())
    recipe["model"] = {**recipe.get("model", {}), **{k: v for k, v in shipped.items() if k != "name"}}
    return recipe, folder / "model.safetensors"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medgen_dev.train.fixed_run", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for checkpoint, logs and curves")
    p.add_argument("--steps", type=int, default=4000, help="length of the learning-rate schedule")
    p.add_argument("--minutes", type=float, default=8.0, help="stop after this long (checkpoint kept)")
    p.add_argument("--batch", type=int, default=0, help="episodes per step (default 32 on a GPU, 8 on a CPU)")
    p.add_argument("--data", default="", help="shared data folder (default: ../shared/data)")
    p.add_argument("--task-weights", default="{}", metavar="JSON", help="episode mix overrides, e.g. "
                   "'{\"twins3d\": 0.12}' (episodes.DEFAULT_TASKS)")
    args = p.parse_args(argv)
    recipe, weights = shipped_recipe()
    recipe["task_weights"] = {**recipe.get("task_weights", {}), **json.loads(args.task_weights)}
    gpu = torch.cuda.is_available()
    recipe.update(out=args.out, steps=args.steps, seconds=args.minutes * 60, init=str(weights),
                  batch=args.batch or (32 if gpu else 8), threads=0 if gpu else recipe.get("threads", 0))
    if args.data:
        recipe["data"] = args.data
    start = time.time()
    out = train(TrainConfig(**recipe))
    rows = (out / "log.csv").read_text().splitlines()
    (out / "run.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(0) if gpu else "cpu", "config": recipe,
        "steps_done": int(rows[-1].split(",")[0]) if rows else 0,
        "wall_seconds": round(time.time() - start, 1)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
