"""Where a model's denoising loses: `python -m medgen_dev.bench.denoise_check MODEL [--levels 0.05 0.1]`.

Two figures the bench's denoising rows do not separate:
- *tissue PSNR on training-like episodes*: the trainer's own denoising episodes (grid-sized crops,
  the start the model's config names), scored on the clean target's tissue (above FOREGROUND) for
  the start and for the model, on the training volumes and on the held-out ones. Whole-crop PSNR
  hides the tissue: removing the Rician bias of air wins it.
- *the start alone on the bench's rows*: a fresh network (its image head is the identity) with the
  model's `denoise_inputs`, i.e. what the model's correction adds to or takes from.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from medgen.core.config import ModelConfig
from medgen.io.weights import load_model
from medgen.nn.model import InContextUNet
from medgen_dev.bench.data import load_config
from medgen_dev.bench.runner import image_tasks
from medgen_dev.train.datasets import load_cases
from medgen_dev.train.episodes import EpisodeSampler, collate
from medgen_dev.train.trainer import FOREGROUND, TrainConfig


def _psnr(x: np.ndarray, y: np.ndarray, where: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((x[where] - y[where]) ** 2), 1e-12)))


def tissue_psnr(model, cases, level: float, n: int = 30, seed: int = 5) -> tuple[float, float, int]:
    """Mean tissue PSNR of the start and of the model over n denoising episodes at noise `level`,
    and how many episodes the model improved (crops with < 100 tissue pixels are skipped)."""
    sampler = EpisodeSampler(cases, model.config.grid, seed=seed, augment=False,
                             denoise_inputs=model.config.denoise_inputs)
    sampler.rng = _FixedLevel(sampler.rng, level)
    start, ours = [], []
    for _ in range(n):
        e = sampler._denoise(4)
        tissue = e.target > FOREGROUND
        if tissue.sum() < 100:
            continue
        b = {k: torch.from_numpy(v) for k, v in collate([e]).items()}
        with torch.inference_mode():
            y = model(b["ctx_images"], b["ctx_targets"], b["query"], b["task"], b["modality"], b["prior"],
                      b["prior_valid"])["image"][0, 0].numpy()
        start.append(_psnr(e.query, e.target, tissue))
        ours.append(_psnr(y, e.target, tissue))
    return float(np.mean(start)), float(np.mean(ours)), sum(o > s for o, s in zip(ours, start))


class _FixedLevel:
    """The sampler's generator with the denoising noise level pinned (its uniform(0.03, 0.15) draw)."""

    def __init__(self, rng: np.random.Generator, level: float) -> None:
        self.rng, self.level = rng, level

    def __getattr__(self, name: str):
        return getattr(self.rng, name)

    def uniform(self, low=0.0, high=1.0, size=None):
        return self.level if (low, high) == (0.03, 0.15) else self.rng.uniform(low, high, size)


def start_alone(config: ModelConfig) -> dict[str, dict[str, float]]:
    """The bench's denoising rows for a fresh network with this config (the start, unchanged)."""
    torch.manual_seed(0)
    cfg = load_config()
    cfg = replace(cfg, image_cases=[c for c in cfg.image_cases if c.task == "denoise"])
    rows = image_tasks(InContextUNet(config).eval(), cfg, "cpu", lambda m: None)[0]["rows"]
    return {r["case"]: {m: v["psnr"] for m, v in r["methods"].items()} for r in rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medgen_dev.bench.denoise_check", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model id, folder or safetensors file")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.05, 0.1])
    args = ap.parse_args(argv)
    model = load_model(args.model)[0]
    holdout = TrainConfig().holdout
    cases = [c for c in load_cases() if not c.is_2d]
    groups = {"training volumes": [c for c in cases if c.name not in holdout],
              "held-out volumes": [c for c in cases if c.name in holdout]}
    print("| volumes | noise | start (tissue dB) | model | episodes improved |\n|---|---|---|---|---|")
    for level in args.levels:
        for name, group in groups.items():
            s, m, better = tissue_psnr(model, group, level)
            print(f"| {name} | {level:g} | {s:.2f} | {m:.2f} | {better} |", flush=True)
    for case, methods in start_alone(model.config).items():
        print(f"start alone, {case}: " + ", ".join(f"{m} {v:.2f} dB" for m, v in methods.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
