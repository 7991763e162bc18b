"""`medgen train --config FILE`: task-mixed episodic training with resumable checkpoints.

The loop is deliberately plain: sample a task-mixed batch, one forward pass, a loss per task
(Dice + BCE for segmentation, L1 for image tasks), AdamW, a CSV row. Checkpoints are safetensors
written atomically, so a session cut off mid-write never leaves a broken file behind.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from safetensors.torch import load_file, save_file

from .config import PRESETS, TASKS, ModelConfig
from .datasets import DEFAULT_DATA, load_cases
from .episodes import EpisodeSampler, collate
from .model import InContextUNet

SEGMENT = TASKS.index("segment")


@dataclass
class TrainConfig:
    out: str = "runs/default"
    preset: str = "small"
    model: dict = field(default_factory=dict)  # overrides of the preset's ModelConfig fields
    data: str = str(DEFAULT_DATA)
    holdout: list = field(default_factory=lambda: ["BraTS-MET-AURORA-example", "brain2", "lung2"])
    steps: int = 1000
    batch: int = 8
    k_max: int = 8
    lr: float = 1e-3
    seconds: float = 0.0  # stop after this many seconds (0: no limit)
    checkpoint_every: int = 100
    seed: int = 0
    threads: int = 0
    task_weights: dict = field(default_factory=dict)
    init: str = ""  # start from these weights (a model.safetensors) unless resuming

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return cls(**data)

    def model_config(self) -> ModelConfig:
        base = PRESETS[self.preset]
        return ModelConfig.from_dict({**base.__dict__, **self.model})


def episode_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                 dice: DiceLoss) -> tuple[torch.Tensor, dict[str, float]]:
    """Dice + BCE on segmentation episodes, L1 on image episodes, averaged over present tasks."""
    seg = batch["task"] == SEGMENT
    losses, parts = [], {}
    if seg.any():
        logits, target = out["seg"][seg], batch["target"][seg]
        l_seg = dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
        losses.append(l_seg)
        parts["seg"] = float(l_seg.detach())
    if (~seg).any():
        # L1 everywhere plus L1 where the query's prior is missing: an inpainting hole is a few
        # percent of the image, and without the second term the identity start never fills it
        err = (out["image"][~seg] - batch["target"][~seg]).abs()
        missing = 1 - batch["prior_valid"][~seg]
        l_img = err.mean() + (err * missing).sum() / missing.sum().clamp(min=1)
        losses.append(l_img)
        parts["image"] = float(l_img.detach())
    return torch.stack(losses).mean(), parts


def train(cfg: TrainConfig, log=print) -> Path:
    """Train (or resume) and return the output folder holding model.safetensors + config.json."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mcfg = cfg.model_config()
    (out / "config.json").write_text(mcfg.to_json())
    model = InContextUNet(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    step = _resume(out, model, opt, log)
    if step == 0 and cfg.init:
        model.load_state_dict(load_file(cfg.init))
    cases = load_cases(Path(cfg.data), holdout=tuple(cfg.holdout))
    sampler = EpisodeSampler(cases, mcfg.grid, cfg.task_weights or None, seed=cfg.seed + step)
    rng = np.random.default_rng(cfg.seed + step)
    dice = DiceLoss(sigmoid=True, batch=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps + 1,
                                                pct_start=0.05, last_epoch=step - 1 if step else -1)
    log_file = (out / "log.csv").open("a", newline="")
    writer = csv.writer(log_file)
    start = time.time()
    model.train()
    while step < cfg.steps and not (cfg.seconds and time.time() - start > cfg.seconds):
        k = int(rng.integers(1, cfg.k_max + 1))
        batch = {n: torch.from_numpy(v) for n, v in collate([sampler.sample(k) for _ in range(cfg.batch)]).items()}
        pred = model(batch["ctx_images"], batch["ctx_targets"], batch["query"], batch["task"],
                     batch["modality"], batch["prior"], batch["prior_valid"])
        loss, parts = episode_loss(pred, batch, dice)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        writer.writerow([step, round(time.time() - start, 1), k, float(loss), parts.get("seg", ""),
                         parts.get("image", "")])
        if step % 10 == 0:
            log_file.flush()
            log(f"step {step} loss {float(loss):.4f} {parts}")
        if step % cfg.checkpoint_every == 0:
            _save(out, model, opt, step)
    _save(out, model, opt, step)
    log_file.close()
    return out


def _save(out: Path, model: InContextUNet, opt: torch.optim.Optimizer, step: int) -> None:
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"format": "pt", "name": model.config.name, "step": str(step)})
    tmp.replace(out / "model.safetensors")
    torch.save({"opt": opt.state_dict(), "step": step}, out / "optimizer.pt.tmp")
    (out / "optimizer.pt.tmp").replace(out / "optimizer.pt")


def _resume(out: Path, model: InContextUNet, opt: torch.optim.Optimizer, log) -> int:
    if not (out / "model.safetensors").exists() or not (out / "optimizer.pt").exists():
        return 0
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    state = torch.load(out / "optimizer.pt", weights_only=True)
    opt.load_state_dict(state["opt"])
    log(f"resumed from step {state['step']}")
    return int(state["step"])
