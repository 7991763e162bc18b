"""`medgen train --config FILE`: task-mixed episodic training with resumable checkpoints.

The loop is deliberately plain: sample a task-mixed batch, one forward pass, a loss per task
(Dice + BCE for segmentation, L1 for image tasks), AdamW, a CSV row. Checkpoints are safetensors
written atomically, so a session cut off mid-write never leaves a broken file behind. Every
`validate_every` steps a fixed set of episodes from the held-out cases is scored (val.csv) and
the learning curves are redrawn (curves.png).

Several processes: `torchrun --nproc_per_node N -m medgen.cli train --config F`
(DistributedDataParallel; gloo on CPU, NCCL on GPUs; each rank draws its own episodes; rank 0
writes). On CUDA the forward pass runs under bfloat16 autocast.
"""

from __future__ import annotations

import csv
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from safetensors.torch import load_file, save_file

from medgen.core.config import PRESETS, TASKS, ModelConfig
from medgen.core.errors import InputError
from medgen_dev.train.datasets import DEFAULT_DATA, load_cases
from medgen_dev.train.episodes import BLIND_MODALITY, EpisodeSampler, collate
from medgen.nn.model import InContextUNet

SEGMENT = TASKS.index("segment")
FOREGROUND = 0.02  # normalised intensity above which an image target is tissue, not background


@dataclass
class TrainConfig:
    out: str = "runs/default"
    preset: str = "small"
    model: dict = field(default_factory=dict)  # overrides of the preset's ModelConfig fields
    data: str = str(DEFAULT_DATA)
    holdout: list = field(default_factory=lambda: ["BraTS-MET-AURORA-example", "brain2", "lung2"]
                          + [f"drive/{i}" for i in range(36, 41)])
    steps: int = 1000
    batch: int = 8
    k_max: int = 8
    lr: float = 1e-3
    seconds: float = 0.0  # stop after this many seconds (0: no limit)
    checkpoint_every: int = 100
    seed: int = 0
    threads: int = 0
    task_weights: dict = field(default_factory=dict)  # episodes.DEFAULT_TASKS overrides
    priors: dict = field(default_factory=dict)  # priors.DEFAULT_PRIORS overrides (ablations)
    blind_modality: float = BLIND_MODALITY  # share of real segmentation episodes with a random modality
    validate_every: int = 200
    val_episodes: int = 48
    init: str = ""  # start from these weights (a model.safetensors) unless resuming

    def __post_init__(self) -> None:
        """A misspelt task or prior (`psuedo3d: 0`) would silently run the ablation with the
        task on: refuse names the samplers do not know, before any data is read."""
        from medgen_dev.train.episodes import DEFAULT_TASKS
        from medgen_dev.train.priors import DEFAULT_PRIORS

        for what, given, known in (("task_weights", self.task_weights, DEFAULT_TASKS),
                                   ("priors", self.priors, DEFAULT_PRIORS)):
            unknown = sorted(set(given) - set(known))
            if unknown:
                raise InputError(f"training config: unknown {what} {', '.join(unknown)}: use "
                                 f"{', '.join(known)}")
            if any(not isinstance(v, (int, float)) or v < 0 for v in given.values()):
                raise InputError(f"training config: {what} must be numbers >= 0, got {given}")
        if not 0 <= self.blind_modality <= 1:
            raise InputError(f"training config: blind_modality is a share in [0, 1], got {self.blind_modality}")
        if self.preset not in PRESETS:
            raise InputError(f"training config: unknown preset {self.preset!r}: use {', '.join(PRESETS)}")

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise InputError(f"{path}: a training config is a mapping of fields, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"{path}: unknown training config field(s) {', '.join(unknown)}: see "
                             "TrainConfig in medgen_dev/train/trainer.py")
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
        # L1 everywhere, plus L1 where the query's prior is missing (an inpainting hole is a few
        # percent of the image: without this term the identity start never fills it), plus L1 on
        # the target's foreground: the plain mean is won in the background (removing the Rician
        # bias of air), and a model trained on it alone blurred tissue, the part a user looks at
        # (foreground PSNR of medgen-small-incontext's denoising 2.5-4 dB below its own start)
        err = (out["image"][~seg] - batch["target"][~seg]).abs()
        missing = 1 - batch["prior_valid"][~seg]
        tissue = (batch["target"][~seg] > FOREGROUND).float()
        l_img = (err.mean() + (err * missing).sum() / missing.sum().clamp(min=1)
                 + (err * tissue).sum() / tissue.sum().clamp(min=1))
        losses.append(l_img)
        parts["image"] = float(l_img.detach())
    return torch.stack(losses).mean(), parts


def train(cfg: TrainConfig, log=print) -> Path:
    """Train (or resume) and return the output folder holding model.safetensors + config.json."""
    rank, world, device = _distributed()
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    mcfg = cfg.model_config()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(mcfg.to_json())
    model = InContextUNet(mcfg).to(device)  # before the optimizer: its resumed state follows
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    step = _resume(out, model, opt, log if rank == 0 else lambda m: None)
    if step == 0 and cfg.init:
        model.load_state_dict(load_file(cfg.init))
    net = model
    if world > 1:  # find_unused: a batch without segmentation episodes leaves the seg head idle
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    cases = load_cases(Path(cfg.data))
    train_cases = [c for c in cases if c.name not in cfg.holdout]
    seed = cfg.seed + step + 1000 * rank
    sampler = EpisodeSampler(train_cases, mcfg.grid, cfg.task_weights or None, seed=seed, priors=cfg.priors,
                             blind_modality=cfg.blind_modality, denoise_inputs=mcfg.denoise_inputs)
    validation = _validation_batches(cases, cfg, mcfg) if rank == 0 else []
    rng = np.random.default_rng(seed)
    dice = DiceLoss(sigmoid=True, batch=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps + 1,
                                                pct_start=0.05, last_epoch=step - 1 if step else -1)
    log_file = (out / "log.csv").open("a", newline="") if rank == 0 else None
    writer = csv.writer(log_file) if log_file else None
    start = time.time()
    if world > 1 and rank == 0:
        log(f"distributed: {world} processes, backend {torch.distributed.get_backend()}")
    model.train()
    while step < cfg.steps and not _out_of_time(cfg, start, world, device):
        k = _shared_k(rng, cfg.k_max, world, device)
        batch = _to(collate(sampler.batch(k, cfg.batch)), device)
        with _autocast(device):
            pred = net(batch["ctx_images"], batch["ctx_targets"], batch["query"], batch["task"],
                       batch["modality"], batch["prior"], batch["prior_valid"])
        loss, parts = episode_loss({n: v.float() for n, v in pred.items()}, batch, dice)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if rank:
            continue
        writer.writerow([step, round(time.time() - start, 1), k, loss.item(), parts.get("seg", ""),
                         parts.get("image", "")])
        if step % 10 == 0:
            log_file.flush()
            log(f"step {step} loss {loss.item():.4f} {parts}")
        if step % cfg.checkpoint_every == 0:
            _save(out, model, opt, step)
        if cfg.validate_every and step % cfg.validate_every == 0:
            _validate(model, validation, out, step, device, log)
    if rank == 0:
        _save(out, model, opt, step)
        log_file.close()
        plot_curves(out)
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def _shared_k(rng: np.random.Generator, k_max: int, world: int, device: torch.device) -> int:
    """The number of pairs this step; every rank uses rank 0's draw (DDP needs one graph shape)."""
    k = torch.tensor([int(rng.integers(1, k_max + 1))], device=device)
    if world > 1:
        torch.distributed.broadcast(k, 0)
    return int(k.item())


def _out_of_time(cfg: TrainConfig, start: float, world: int, device: torch.device) -> bool:
    """The time limit as rank 0 sees it, so that all ranks stop at the same step."""
    flag = torch.tensor([float(bool(cfg.seconds) and time.time() - start > cfg.seconds)], device=device)
    if world > 1:
        torch.distributed.broadcast(flag, 0)
    return bool(flag.item())


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _to(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(v).to(device) for n, v in arrays.items()}


def _validation_batches(cases, cfg: TrainConfig, mcfg: ModelConfig) -> list[dict[str, np.ndarray]]:
    """A fixed set of episodes from the held-out cases (3 pairs each), drawn once per run."""
    held = [c for c in cases if c.name in cfg.holdout]
    if not held or not cfg.validate_every:
        return []
    sampler = EpisodeSampler(held, mcfg.grid, cfg.task_weights or None, seed=12345, priors=cfg.priors, augment=False,
                             denoise_inputs=mcfg.denoise_inputs)
    sampler.weights = {n: w for n, w in sampler.weights.items() if _can_draw(sampler, n)}
    episodes = [sampler.sample(3) for _ in range(cfg.val_episodes)]
    return [collate(episodes[i:i + cfg.batch]) for i in range(0, len(episodes), cfg.batch)]


def _can_draw(sampler: EpisodeSampler, name: str) -> bool:
    need = {"segment3d": sampler.vol_seg, "pseudo3d": sampler.vols, "segment2d": sampler.flat_seg,
            "synthesize": sampler.multi_contrast, "synthetic": [],  # validation: real held-out cases only
            "twins3d": []}  # a training signal: validation stays the episodes other recipes are scored on
    return bool(need.get(name, sampler.images))


@torch.no_grad()
def _validate(model: InContextUNet, batches, out: Path, step: int, device: torch.device,
              log) -> None:
    """Held-out Dice (segmentation, thresholded) and PSNR (image tasks, range 1) -> val.csv."""
    if not batches:
        return
    model.eval()
    scores, psnrs = [], []
    for arrays in batches:
        b = _to(arrays, device)
        with _autocast(device):
            pred = model(b["ctx_images"], b["ctx_targets"], b["query"], b["task"], b["modality"],
                         b["prior"], b["prior_valid"])
        seg = b["task"] == SEGMENT
        if seg.any():
            p, t = (pred["seg"][seg].float() > 0).float(), b["target"][seg]
            inter, total = (p * t).sum((1, 2, 3)), (p + t).sum((1, 2, 3))
            scores += (torch.where(total > 0, 2 * inter / total.clamp(min=1), 1.0)).tolist()
        if (~seg).any():
            mse = ((pred["image"][~seg].float() - b["target"][~seg]) ** 2).mean((1, 2, 3))
            psnrs += (-10 * torch.log10(mse.clamp(min=1e-10))).tolist()
    model.train()
    row = [step, float(np.mean(scores)) if scores else "", float(np.mean(psnrs)) if psnrs else ""]
    new = not (out / "val.csv").exists()
    with (out / "val.csv").open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", "seg_dice", "image_psnr"])
        w.writerow(row)
    log(f"validation at step {step}: Dice {row[1]} PSNR {row[2]}")
    plot_curves(out)


def plot_curves(out: Path) -> Path | None:
    """curves.png: training loss (raw and smoothed, per task) and held-out validation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (out / "log.csv").exists():
        return None
    rows = list(csv.reader((out / "log.csv").open()))
    if not rows:
        return None
    step = np.asarray([float(r[0]) for r in rows])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for col, name in ((3, "total"), (4, "segmentation"), (5, "image tasks")):
        vals = np.asarray([float(r[col]) if r[col] else np.nan for r in rows])
        ok = ~np.isnan(vals)
        if ok.sum() > 1:
            axes[0].plot(step[ok], _smooth(vals[ok]), label=f"{name} (smoothed)")
    axes[0].set(xlabel="step", ylabel="training loss", title="training")
    axes[0].legend()
    if (out / "val.csv").exists():
        val = list(csv.DictReader((out / "val.csv").open()))
        vs = [float(r["step"]) for r in val]
        ax = axes[1]
        ax.plot(vs, [float(r["seg_dice"] or "nan") for r in val], "o-", label="segmentation Dice")
        ax.set(xlabel="step", ylabel="Dice", title="held-out validation")
        ax2 = ax.twinx()
        ax2.plot(vs, [float(r["image_psnr"] or "nan") for r in val], "s--", color="tab:red", label="image PSNR")
        ax2.set_ylabel("PSNR (dB)")
        ax.legend(loc="lower left")
        ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=80)
    plt.close(fig)
    return out / "curves.png"


def _smooth(x: np.ndarray, n: int = 25) -> np.ndarray:
    n = max(1, min(n, len(x) // 3 or 1))
    return np.convolve(np.pad(x, (n - 1, 0), mode="edge"), np.ones(n) / n, mode="valid")


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


def main(argv: list[str]) -> int:
    """`medgen train --config FILE` (also run under torchrun for several processes)."""
    import argparse

    parser = argparse.ArgumentParser(prog="medgen train", description="train a model from a YAML/JSON config")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    train(TrainConfig.from_file(args.config))
    return 0
