"""Training on real data: a tiny configuration learns (loss falls) and resumes from its checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from MedicalGeneralistLib.episodes import EpisodeSampler
from MedicalGeneralistLib.train import TrainConfig, train


def _losses(run: Path) -> list[float]:
    with (run / "log.csv").open() as f:
        return [float(row[3]) for row in csv.reader(f)]


def test_tiny_training_loss_falls_and_resumes(shared_data: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(out=str(tmp_path / "run"), preset="tiny", data=str(shared_data), steps=60,
                      batch=4, k_max=3, lr=3e-3, checkpoint_every=30, seed=1)
    run = train(cfg, log=lambda m: None)
    losses = _losses(run)
    assert len(losses) == 60
    assert np.mean(losses[-15:]) < np.mean(losses[:15]), "loss did not fall over 60 steps"
    assert (run / "model.safetensors").exists() and (run / "config.json").exists()
    cfg.steps = 65
    train(cfg, log=lambda m: None)
    assert len(_losses(run)) == 65  # resumed at step 60, not restarted


@pytest.fixture(scope="module")
def sampler(shared_data: Path) -> EpisodeSampler:
    from MedicalGeneralistLib.datasets import load_cases

    return EpisodeSampler(load_cases(shared_data, busi_limit=10), grid=64, seed=0)


@pytest.mark.parametrize("kind", ["segment3d", "segment2d", "denoise", "inpaint", "synthesize"])
def test_every_episode_kind_is_well_formed(sampler: EpisodeSampler, kind: str) -> None:
    ep = getattr(sampler, f"_{kind}")(3)
    assert ep.ctx_images.shape == (3, 64, 64) and ep.query.shape == (64, 64)
    assert ep.target.shape == (64, 64) and np.isfinite(ep.ctx_images).all()
    if kind.startswith("segment"):
        assert ep.ctx_targets.any(), "segmentation examples must show the structure"
