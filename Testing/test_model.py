"""The in-context network: size, shapes, order invariance, caching, determinism.

All inputs are real slices of the shipped MNI152 sample (normalised like the engine does) with
their tissue labels; the weights are the shipped model's, whatever its training state.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.core.config import ModelConfig, modality_index, task_index
from medgen.prompts import pairs_from_volumes
from medgen.core.intensity import fit_normalizer
from medgen.nn.model import InContextUNet, count_parameters
from medgen.infer.pipeline import RunOptions, run
from medgen.infer.segment import SegmentSettings
from medgen.core.volume import Volume

SEG, MR = task_index("segment"), modality_index("mr")


def _real_slices(t1: Volume, tissue: Volume, indices, rows: int, cols: int):
    """Normalised axial slices (k, 1, rows, cols) and white-matter masks, cut from the sample."""
    norm = fit_normalizer(t1.array, "mr")
    r0 = (t1.shape[1] - rows) // 2 if rows <= t1.shape[1] else 0
    c0 = (t1.shape[2] - cols) // 2 if cols <= t1.shape[2] else 0
    imgs, tgts = [], []
    for i in indices:
        img = np.zeros((rows, cols), np.float32)
        tgt = np.zeros((rows, cols), np.float32)
        a = norm(t1.array[i, r0:r0 + rows, c0:c0 + cols])
        img[:a.shape[0], :a.shape[1]] = a
        tgt[:a.shape[0], :a.shape[1]] = tissue.array[i, r0:r0 + rows, c0:c0 + cols] == 2
        imgs.append(img)
        tgts.append(tgt)
    return torch.as_tensor(np.stack(imgs))[:, None], torch.as_tensor(np.stack(tgts))[:, None]


@pytest.fixture(scope="module")
def pairs(sample_t1, sample_tissue):
    """4 context pairs + 2 queries (axial slices 30..50), 128 x 128 (zero-padded around 94 x 77)."""
    ctx_i, ctx_t = _real_slices(sample_t1, sample_tissue, [30, 36, 44, 50], 128, 128)
    q, _ = _real_slices(sample_t1, sample_tissue, [40, 41], 128, 128)
    return ctx_i, ctx_t, q


def _labels(b: int):
    return torch.full((b,), SEG, dtype=torch.long), torch.full((b,), MR, dtype=torch.long)


def test_default_config_is_small() -> None:
    n = count_parameters(InContextUNet(ModelConfig()))
    assert 100_000 < n <= 3_000_000


def test_shipped_model_is_small(model) -> None:
    assert count_parameters(model) <= 3_000_000
    assert not model.training


@pytest.mark.parametrize("rows, cols", [(64, 96), (128, 128)])
def test_output_shapes_both_heads(model, sample_t1, sample_tissue, rows: int, cols: int) -> None:
    ctx_i, ctx_t = _real_slices(sample_t1, sample_tissue, [30, 44, 50], rows, cols)
    q, _ = _real_slices(sample_t1, sample_tissue, [40, 41], rows, cols)
    task, modality = _labels(2)
    with torch.inference_mode():
        out = model(ctx_i[None].expand(2, -1, -1, -1, -1), ctx_t[None].expand(2, -1, -1, -1, -1), q,
                    task, modality)
    assert set(out) >= {"seg", "image"}
    for head in ("seg", "image"):
        assert out[head].shape == (2, 1, rows, cols)
        assert torch.isfinite(out[head]).all()


def test_query_size_may_differ_from_context_size(model, pairs, sample_t1, sample_tissue) -> None:
    """Context encoded at the grid size, query at 64 x 96: the interaction resamples the context."""
    ctx_i, ctx_t, _ = pairs
    q, _ = _real_slices(sample_t1, sample_tissue, [40], 64, 96)
    task, modality = _labels(1)
    with torch.inference_mode():
        cache = model.encode_context(ctx_i[None], ctx_t[None], task, modality)
        out = model.predict(q, cache)
    assert out["seg"].shape == out["image"].shape == (1, 1, 64, 96)


def test_context_order_does_not_matter(model, pairs) -> None:
    ctx_i, ctx_t, q = pairs
    task, modality = _labels(1)
    prior = (q > 0.5).float()
    outs = []
    with torch.inference_mode():
        for perm in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
            outs.append(model(ctx_i[perm][None], ctx_t[perm][None], q[:1], task, modality, prior[:1]))
    for other in outs[1:]:
        for head in ("seg", "image"):
            torch.testing.assert_close(other[head], outs[0][head], atol=1e-5, rtol=0)


def test_cached_path_equals_forward(model, pairs) -> None:
    ctx_i, ctx_t, q = pairs
    task, modality = _labels(2)
    ci, ct = ctx_i[None].expand(2, -1, -1, -1, -1), ctx_t[None].expand(2, -1, -1, -1, -1)
    with torch.inference_mode():
        direct = model(ci, ct, q, task, modality)
        cache = model.encode_context(ci, ct, task, modality)
        cached = model.predict(q, cache)
        again = model.predict(q, cache)  # a cache is reusable: predicting does not change it
    for head in ("seg", "image"):
        torch.testing.assert_close(cached[head], direct[head], atol=1e-5, rtol=0)
        torch.testing.assert_close(again[head], cached[head], atol=0, rtol=0)


def test_cache_cat_equals_encoding_all_pairs(model, pairs) -> None:
    """cat(first two pairs, last two pairs) == all four pairs at once: mean and attention agree."""
    ctx_i, ctx_t, q = pairs
    task, modality = _labels(1)
    with torch.inference_mode():
        whole = model.encode_context(ctx_i[None], ctx_t[None], task, modality)
        a = model.encode_context(ctx_i[None, :2], ctx_t[None, :2], task, modality)
        b = model.encode_context(ctx_i[None, 2:], ctx_t[None, 2:], task, modality)
        joined = a.cat(b)
        assert joined.k == whole.k == 4
        torch.testing.assert_close(joined.pooled, whole.pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(joined.tokens, whole.tokens, atol=1e-5, rtol=1e-5)
        for level in whole.levels:
            torch.testing.assert_close(joined.levels[level], whole.levels[level], atol=1e-5, rtol=1e-5)
        y_whole, y_joined = model.predict(q[:1], whole), model.predict(q[:1], joined)
    for head in ("seg", "image"):
        torch.testing.assert_close(y_joined[head], y_whole[head], atol=1e-5, rtol=0)


def test_cache_index_selects_runs(model, pairs) -> None:
    ctx_i, ctx_t, q = pairs
    task, modality = _labels(2)
    targets = torch.stack([ctx_t, 1 - ctx_t])  # run 0: white matter, run 1: everything else
    with torch.inference_mode():
        cache = model.encode_context(torch.stack([ctx_i, ctx_i]), targets, task, modality)
        both = model.predict(q, cache)["seg"]
        second = model.predict(q[1:], cache.index([1]))["seg"]
    torch.testing.assert_close(second[0], both[1], atol=1e-5, rtol=0)


def test_pipeline_is_deterministic(model, sample_t1, sample_tissue) -> None:
    """Same seed, same input: the same labels twice (a 6-slice slab, propagation)."""
    slab = Volume(np.ascontiguousarray(sample_t1.array[38:44]), sample_t1.spacing, sample_t1.origin,
                  sample_t1.direction)
    labels = slab.with_array(np.ascontiguousarray(sample_tissue.array[38:44]))
    examples = pairs_from_volumes(slab, labels, 0, [0, 5], "segment", "mr", own=True)
    options = RunOptions("segment", 0, "mr", "cpu", seed=3, segment=SegmentSettings(mode="propagate"))
    first = run(model, slab, examples, options)
    second = run(model, slab, examples, options)
    assert first is not None and second is not None
    np.testing.assert_array_equal(first.array, second.array)
    denoise = pairs_from_volumes(slab, slab, 0, [1, 4], "denoise", "mr", own=False)
    one = run(model, slab, denoise, RunOptions("denoise", 0, "mr", "cpu", seed=3)).array
    two = run(model, slab, denoise, RunOptions("denoise", 0, "mr", "cpu", seed=3)).array
    np.testing.assert_array_equal(one, two)


def test_examples_from_other_images_adapt_a_copy_by_default(model, sample_t1, sample_tissue) -> None:
    """Cross-subject examples are learnt from (test-time adaptation, pipeline.CROSS_SUBJECT_ADAPT_STEPS)
    unless the user sets the steps; the shared model is never changed. Real slices of the sample,
    each one its own 2D 'subject'."""
    from medgen.infer.pipeline import _adapted

    def as_2d(i: int) -> tuple[Volume, Volume]:
        img = Volume(sample_t1.array[i][None].astype(np.float32), sample_t1.spacing, is_2d=True)
        return img, img.with_array((sample_tissue.array[i][None] == 2).astype(np.uint8))

    examples = [e for i in (30, 50) for e in pairs_from_volumes(*as_2d(i), 0, None, "segment", "mr", own=False)]
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    options = RunOptions("segment", 0, "mr", "cpu")
    tuned = _adapted(model, "cpu", examples, options, in_volume=False)
    assert tuned is not model
    assert any(not torch.equal(before[n], p) for n, p in tuned.state_dict().items())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert _adapted(model, "cpu", examples, options, in_volume=True) is model  # propagation: none
    off = RunOptions("segment", 0, "mr", "cpu", adapt_steps=0)
    assert _adapted(model, "cpu", examples, off, in_volume=False) is model
    image_task = RunOptions("denoise", 0, "mr", "cpu")
    assert _adapted(model, "cpu", examples, image_task, in_volume=False) is model
