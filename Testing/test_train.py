"""Training on real data: a tiny configuration learns (loss falls) and resumes from its checkpoint."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medgen_dev.train.episodes import EpisodeSampler
from medgen_dev.train.trainer import TrainConfig, train


def _losses(run: Path) -> list[float]:
    with (run / "log.csv").open() as f:
        return [float(row[3]) for row in csv.reader(f)]


def test_tiny_training_loss_falls_and_resumes(shared_data: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(out=str(tmp_path / "run"), preset="tiny", data=str(shared_data), steps=60,
                      batch=4, k_max=3, lr=3e-3, checkpoint_every=30, seed=1, validate_every=30,
                      val_episodes=8)
    run = train(cfg, log=lambda m: None)
    losses = _losses(run)
    assert len(losses) == 60
    assert np.mean(losses[-15:]) < np.mean(losses[:15]), "loss did not fall over 60 steps"
    assert (run / "model.safetensors").exists() and (run / "config.json").exists()
    val = list(csv.DictReader((run / "val.csv").open()))
    assert [int(r["step"]) for r in val] == [30, 60]
    assert all(0 <= float(r["seg_dice"]) <= 1 and np.isfinite(float(r["image_psnr"])) for r in val)
    from PIL import Image
    assert Image.open(run / "curves.png").size[0] > 400
    cfg.steps = 65
    train(cfg, log=lambda m: None)
    assert len(_losses(run)) == 65  # resumed at step 60, not restarted


def test_two_process_ddp_training_on_gloo(shared_data: Path, tmp_path: Path) -> None:
    """torchrun with two CPU processes (gloo): one process group, rank 0 alone writes the run."""
    cfg = {"out": str(tmp_path / "ddp"), "preset": "tiny", "data": str(shared_data), "steps": 6,
           "batch": 2, "k_max": 2, "checkpoint_every": 3, "validate_every": 0, "threads": 1}
    (tmp_path / "ddp.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "MedicalGeneralist")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "medgen.cli", "train",
                           "--config", str(tmp_path / "ddp.json")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed: 2 processes, backend gloo" in proc.stdout
    assert len(_losses(tmp_path / "ddp")) == 6  # one row per step, not one per rank
    assert (tmp_path / "ddp" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def sampler(shared_data: Path) -> EpisodeSampler:
    from medgen_dev.train.datasets import load_cases

    return EpisodeSampler(load_cases(shared_data, busi_limit=10), grid=64, seed=0)


@pytest.mark.parametrize("kind", ["segment3d", "pseudo3d", "segment2d", "synthetic", "denoise", "inpaint",
                                  "synthesize"])
def test_every_episode_kind_is_well_formed(sampler: EpisodeSampler, kind: str) -> None:
    ep = getattr(sampler, f"_{kind}")(3)
    assert ep.ctx_images.shape == (3, 64, 64) and ep.query.shape == (64, 64)
    assert ep.target.shape == (64, 64) and np.isfinite(ep.ctx_images).all()
    if kind.startswith("segment") or kind == "synthetic":
        assert ep.ctx_targets.any(), "segmentation examples must show the structure"


@pytest.mark.parametrize("prior", ["fill", "nearest", "neighbour", "partial", "none"])
def test_every_prior_kind_reaches_the_episode(shared_data: Path, prior: str) -> None:
    """Each prior the sampler can draw, alone: a fill-between-slices prior mostly overlaps the
    truth (it interpolates labelled slices on both sides); "none" leaves the channel empty."""
    from medgen_dev.train.datasets import load_cases

    cases = [c for c in load_cases(shared_data, busi_limit=0) if c.name in ("totalseg_ct", "voxelmorph")]
    only = {n: float(n == prior) for n in ("fill", "nearest", "neighbour", "partial", "none")}
    s = EpisodeSampler(cases, grid=64, seed=3, priors=only)
    eps = [s._segment3d(3) for _ in range(12)]
    if prior == "none":
        assert all(not e.prior.any() and not e.prior_valid.any() for e in eps)
        return
    assert all(e.prior_valid.any() for e in eps)
    overlap = [2 * (e.prior.astype(bool) & e.target).sum() / max(e.prior.sum() + e.target.sum(), 1) for e in eps]
    if prior == "fill":
        assert np.mean(overlap) > 0.5, overlap


def test_supervoxels_cover_unlabelled_volumes(shared_data: Path) -> None:
    from medgen_dev.train.datasets import load_cases
    from medgen_dev.train.pseudotasks import Supervoxels

    case = next(c for c in load_cases(shared_data, busi_limit=0) if c.name == "prostate")
    regions = Supervoxels().regions(case)
    assert regions.shape == case.image.shape and case.labels is None
    assert len(np.unique(regions)) > 10  # many regions, background (0) included


def test_augmentation_moves_every_array_of_an_episode_together(sampler: EpisodeSampler) -> None:
    """Flips and turns apply to images, targets and prior alike: a target defined pixel-wise
    from its image still matches it after augmentation, whichever transforms were drawn."""
    import copy

    from medgen_dev.train.augment import augment
    from medgen.core.config import task_index

    rng = np.random.default_rng(0)
    for _ in range(12):
        ep = sampler._denoise(3)  # image task: geometric transforms only
        ep.ctx_targets = ep.ctx_images > np.median(ep.ctx_images)
        ep.target = ep.query > np.median(ep.query)
        ep.prior, before = ep.query.copy(), copy.deepcopy(ep)
        out = augment(ep, rng)
        assert np.array_equal(out.ctx_targets, out.ctx_images > np.median(before.ctx_images))
        assert np.array_equal(out.target, out.query > np.median(before.query))
        assert np.array_equal(out.prior, out.query) and out.target.sum() == before.target.sum()
    seg = sampler._segment3d(2)
    assert seg.task == task_index("segment") and augment(seg, rng).ctx_targets.dtype == bool


def test_synthesis_starts_from_the_examples_linear_map(shared_data: Path) -> None:
    """The synthesis query starts from a linear map fitted on the example pairs (real BraTS
    T1 -> T2 slices): closer to the truth than the raw T1, and a no-op without foreground."""
    from medgen_dev.train.datasets import load_cases
    from medgen.infer.imagetasks import linear_start

    case = next(c for c in load_cases(shared_data, busi_limit=0) if c.name == "TCGA-DU-7294")
    t1, t2 = case.contrasts["t1"], case.contrasts["t2"]
    start = linear_start(t1[[60, 100]], t2[[60, 100]])(t1[80])
    assert np.mean((start - t2[80]) ** 2) < 0.5 * np.mean((t1[80] - t2[80]) ** 2)
    blank = np.zeros((2, 8, 8), np.float32)
    assert np.array_equal(linear_start(blank, blank)(t1[80]), t1[80])


def test_modality_hiding_follows_its_share(sampler: EpisodeSampler) -> None:
    """The ablation of hidden modalities needs the share to be honoured: on CT volumes alone, 0
    keeps every episode's modality CT, 1 redraws it (CT again 1 time in 5, so most differ)."""
    from medgen.core.config import modality_index
    from medgen_dev.train.trainer import TrainConfig
    from medgen.core.errors import InputError

    ct = [c for c in sampler.vol_seg if c.modality == "ct"]
    only = {"segment3d": 1.0, "pseudo3d": 0, "segment2d": 0, "synthetic": 0, "denoise": 0, "inpaint": 0,
            "synthesize": 0}
    drawn = {share: [EpisodeSampler(ct, grid=64, seed=i, weights=only, blind_modality=share).sample(2).modality
                     for i in range(10)] for share in (0.0, 1.0)}
    assert drawn[0.0] == [modality_index("ct")] * 10
    assert sum(m != modality_index("ct") for m in drawn[1.0]) >= 4
    with pytest.raises(InputError, match="blind_modality is a share"):
        TrainConfig(blind_modality=1.5)


def test_segmentation_episodes_draw_the_contrast_too(shared_data: Path) -> None:
    """BraTS sub-regions are outlined on FLAIR or T1c as often as on T1: in-volume episodes of a
    multi-contrast case take their images (examples and query alike) from one contrast drawn per
    episode. A blank stand-in for one contrast marks the episodes that drew it."""
    from dataclasses import replace

    from medgen_dev.train.datasets import load_cases

    brats = next(c for c in load_cases(shared_data, busi_limit=0) if c.name == "TCGA-DU-7294")
    case = replace(brats, contrasts={"flair": brats.contrasts["flair"], "blank": np.zeros_like(brats.image)})
    only = {"segment3d": 1.0, "pseudo3d": 0, "segment2d": 0, "synthetic": 0, "denoise": 0, "inpaint": 0,
            "synthesize": 0}
    no_prior = {"none": 1.0, "neighbour": 0, "partial": 0, "fill": 0, "nearest": 0}  # queries on the structure
    sampler = EpisodeSampler([case], grid=64, seed=5, weights=only, augment=False, priors=no_prior)
    blank = []
    for _ in range(12):
        e = sampler.sample(2)
        blank.append(not e.query.any() and not e.ctx_images.any())
        assert blank[-1] or (e.query.any() and e.ctx_images.any())  # one contrast per episode
    assert 3 <= sum(blank) <= 9


def test_twin_episodes_show_the_same_images_with_two_targets(shared_data: Path) -> None:
    """twins3d: two episodes on the same slices of one label map (real aseg and TotalSegmentator
    labels), identical images after augmentation, different structures as targets, side by side
    in a batch so that one step sees both; single-label volumes never make twins."""
    from medgen_dev.train.datasets import load_cases

    cases = [c for c in load_cases(shared_data, busi_limit=0) if c.name in ("voxelmorph", "totalseg_ct", "brain1")]
    only = {"segment3d": 0, "pseudo3d": 0, "segment2d": 0, "synthetic": 0, "denoise": 0, "inpaint": 0,
            "synthesize": 0, "twins3d": 1.0}
    sampler = EpisodeSampler(cases, grid=64, seed=2, weights=only)
    for _ in range(6):
        first, second = sampler.group(3)
        assert np.array_equal(first.query, second.query) and np.array_equal(first.ctx_images, second.ctx_images)
        assert first.modality == second.modality and not first.prior.any()
        assert not np.array_equal(first.ctx_targets, second.ctx_targets)
        assert not np.any(first.ctx_targets & second.ctx_targets)  # two structures of one label map
    batch = sampler.batch(3, 4)
    assert len(batch) == 4 and np.array_equal(batch[0].query, batch[1].query)
    lone = EpisodeSampler([c for c in cases if c.name == "brain1"], grid=64, seed=2, weights=only)
    assert len(lone.group(3)) == 1  # one lesion label: an ordinary in-volume episode instead


def test_denoising_start_fitted_on_the_examples(shared_data: Path) -> None:
    """The start of `denoise_inputs = "tuned-nlm(+noisy)"` models: NL-means tuned on the example
    pairs (real BraTS T1 slices, Rician noise at 5 %) is closer to the clean tissue than NL-means
    from the slice's own noise estimate; the sampler trains on the inputs the config names (that
    start and the noisy slice in the prior channel)."""
    from medgen.core.config import ModelConfig
    from medgen.infer.imagetasks import classical_denoise, example_denoise
    from medgen_dev.train.datasets import load_cases

    t1 = next(c for c in load_cases(shared_data, busi_limit=0) if c.name == "TCGA-DU-7294").contrasts["t1"]
    rng = np.random.default_rng(0)
    g = rng.standard_normal((2,) + t1.shape).astype(np.float32) * 0.05
    noisy = np.sqrt((t1 + g[0]) ** 2 + g[1] ** 2)
    tissue = t1[80] > 0.02
    err = lambda x: float(np.mean((x[0][tissue] - t1[80][tissue]) ** 2))
    fitted = example_denoise(noisy[[60, 100]], t1[[60, 100]])(noisy[80][None])
    assert err(fitted) < err(classical_denoise(noisy[80][None])) < err(noisy[80][None])
    with pytest.raises(ValueError, match="denoise_inputs must be one of slice-nlm, tuned-nlm, tuned-nlm"):
        ModelConfig(denoise_inputs="tuned-nlm+clean")
    only = {"segment3d": 0, "pseudo3d": 0, "segment2d": 0, "synthetic": 0, "denoise": 1.0, "inpaint": 0,
            "synthesize": 0}
    cases = [c for c in load_cases(shared_data, busi_limit=0) if c.name == "TCGA-DU-7294"]
    draws = {s: EpisodeSampler(cases, grid=64, seed=3, weights=only, augment=False, denoise_inputs=s).sample(2)
             for s in ("slice-nlm", "tuned-nlm", "tuned-nlm+noisy")}
    old, tuned, new = draws["slice-nlm"], draws["tuned-nlm"], draws["tuned-nlm+noisy"]
    assert np.array_equal(old.target, new.target)  # the same draw, other inputs
    assert not np.array_equal(old.query, new.query) and not old.prior_valid.any() and new.prior_valid.all()
    assert np.array_equal(tuned.query, new.query) and not tuned.prior_valid.any()  # the start alone
    assert np.mean((new.prior - new.target) ** 2) > np.mean((new.query - new.target) ** 2)  # noisy, then start


def test_misspelt_ablation_is_refused(tmp_path: Path) -> None:
    """`psuedo3d: 0` used to train with the task on; unknown names now stop before any data loads."""
    from medgen.core.errors import InputError
    from medgen_dev.train.trainer import TrainConfig

    with pytest.raises(InputError, match="unknown task_weights psuedo3d"):
        TrainConfig(task_weights={"psuedo3d": 0})
    with pytest.raises(InputError, match="unknown priors neighbor"):
        TrainConfig(priors={"neighbor": 0})
    config = tmp_path / "train.json"
    config.write_text('{"steps": 10, "stpes": 20}')
    with pytest.raises(InputError, match="unknown training config field.*stpes"):
        TrainConfig.from_file(config)
    assert TrainConfig(task_weights={"pseudo3d": 0}).task_weights == {"pseudo3d": 0}


def test_fixed_length_run_continues_the_shipped_model(shared_data: Path, tmp_path: Path) -> None:
    """The script a GPU session runs, on the CPU: starts from the shipped weights with the shipped
    recipe and leaves checkpoint, log and run.json in one folder."""
    from safetensors.torch import load_file

    from medgen_dev.train.fixed_run import main, shipped_recipe

    out = tmp_path / "fixed"
    assert main(["--out", str(out), "--steps", "2", "--batch", "2", "--minutes", "5",
                 "--data", str(shared_data), "--task-weights", '{"twins3d": 0.5}']) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["device"] == "cpu" and info["steps_done"] == 2 and info["config"]["task_weights"] == {"twins3d": 0.5}
    shipped = json.loads((shipped_recipe()[1].parent / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == shipped  # trained on the inputs it is run with
    start = load_file(str(shipped_recipe()[1]))
    after = load_file(str(out / "model.safetensors"))
    assert start.keys() == after.keys()
    moved = [n for n in start if not np.array_equal(start[n].numpy(), after[n].numpy())]
    assert moved and len(moved) < len(start) + 1  # trained from the shipped weights, not from scratch
    drift = max(float((start[n] - after[n]).abs().max()) for n in start)
    assert drift < 0.05, "two small steps from the shipped weights cannot move them this far"


def test_denoise_check_scores_the_start_a_fresh_network_returns(shared_data: Path) -> None:
    """medgen_dev.bench.denoise_check on real volumes at a pinned noise level: a fresh network's
    image head is the identity, so the model's tissue PSNR is its start's, and the start is far
    above the noisy input's (about 26 dB at 5 % noise)."""
    from medgen.core.config import ModelConfig
    from medgen.nn.model import InContextUNet
    from medgen_dev.bench.denoise_check import tissue_psnr
    from medgen_dev.train.datasets import load_cases

    cases = [c for c in load_cases(shared_data, busi_limit=0) if c.name == "TCGA-DU-7294"]
    model = InContextUNet(ModelConfig(channels=(8, 16, 32, 48, 64), embed_dim=32, heads=2, grid=64,
                                      denoise_inputs="tuned-nlm+noisy")).eval()
    start, ours, better = tissue_psnr(model, cases, 0.05, n=4)
    assert start == pytest.approx(ours, abs=1e-4) and better == 0
    assert start > 29.0
