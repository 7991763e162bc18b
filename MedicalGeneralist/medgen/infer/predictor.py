"""The model on a device, fed numpy grids, in memory-sized chunks, with a cancel check per chunk.

Everything above this layer speaks numpy in slice pixels; everything below speaks tensors on a
device. Keeping the conversion, AMP, `inference_mode` and chunking here means segmentation and
image tasks share one well-tested path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from medgen.core.device import autocast, batch_limit
from medgen.core.errors import Cancelled
from medgen.nn.model import ContextCache, InContextUNet

CancelFn = Callable[[], bool]
CPU_PASS_BYTES = 2 << 30  # by the (generous) estimate of chunk_size: 8 query slices with 10 pairs


def stack_caches(caches: list[ContextCache]) -> ContextCache:
    """Concatenate runs (batch axis) of caches that hold the same number of pairs."""
    first = caches[0]
    return ContextCache({l: torch.cat([c.levels[l] for c in caches]) for l in first.levels},
                        torch.cat([c.tokens for c in caches]), torch.cat([c.pooled for c in caches]),
                        torch.cat([c.task for c in caches]), torch.cat([c.modality for c in caches]))


class Predictor:
    """Wraps an InContextUNet for inference: numpy in, numpy out, chunked to fit memory."""

    def __init__(self, model: InContextUNet, device: torch.device, cancel: CancelFn | None = None) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.cancel = cancel or (lambda: False)

    def check_cancel(self) -> None:
        if self.cancel():
            raise Cancelled("cancelled by the user; nothing was written")

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=self.device)

    def chunk_size(self, size: int, k: int) -> int:
        """Items per forward pass: a rough activation estimate against free memory."""
        per_item = size * size * 4 * (sum(self.model.config.channels) * 8 + 2 * k * self.model.config.channels[1])
        limit = batch_limit(per_item, self.device)
        if self.device.type == "cpu":  # a CPU is as fast with a few items per pass: bound the memory
            limit = max(1, min(limit, CPU_PASS_BYTES // per_item))
        return limit

    @torch.inference_mode()
    def encode(self, images: np.ndarray, targets: np.ndarray, task: int, modality: int) -> ContextCache:
        """Encode pairs once. images, targets: [B, k, S, S] normalised grids."""
        b, k, s = images.shape[0], images.shape[1], images.shape[-1]
        step = max(1, self.chunk_size(s, 1) // max(k, 1))
        parts = []
        for i in range(0, b, step):
            self.check_cancel()
            t = torch.full((min(step, b - i),), task, device=self.device, dtype=torch.long)
            m = torch.full_like(t, modality)
            with autocast(self.device):
                parts.append(self.model.encode_context(self._tensor(images[i:i + step, :, None]),
                                                       self._tensor(targets[i:i + step, :, None]), t, m))
        cache = parts[0] if len(parts) == 1 else stack_caches(parts)
        return _float(cache)

    @torch.inference_mode()
    def predict(self, queries: np.ndarray, cache: ContextCache, head: str,
                priors: np.ndarray | None = None, valid: np.ndarray | None = None) -> np.ndarray:
        """queries (+ priors, valid): [B, S, S]; cache has B runs. Returns probabilities or images."""
        b, s = queries.shape[0], queries.shape[-1]
        step = self.chunk_size(s, cache.k)
        out = []
        for i in range(0, b, step):
            self.check_cancel()
            sl = slice(i, i + step)
            prior = None if priors is None else self._tensor(priors[sl, None])
            pv = None if valid is None else self._tensor(valid[sl, None])
            # one chunk for all: the cache as it is (indexing would copy every pair's features)
            run = cache if step >= b else cache.index(list(range(i, min(i + step, b))))
            with autocast(self.device):
                y = self.model.predict(self._tensor(queries[sl, None]), run, prior, pv)[head]
            y = torch.sigmoid(y) if head == "seg" else y
            out.append(y.float()[:, 0].cpu().numpy())
        return np.concatenate(out)

    def predict_tensor(self, x: torch.Tensor, cache: ContextCache, head: str) -> torch.Tensor:
        """Tensor path for MONAI's sliding window: x [b, C, h, w] with C = query(, prior, valid)."""
        self.check_cancel()
        run = cache.index([0] * x.shape[0])
        prior = x[:, 1:2] if x.shape[1] > 1 else None
        valid = x[:, 2:3] if x.shape[1] > 2 else None
        with autocast(self.device):
            y = self.model.predict(x[:, :1], run, prior, valid)[head]
        return y.float()


def _float(cache: ContextCache) -> ContextCache:
    """Keep caches in float32 so chained memory pairs concatenate with user pairs under AMP."""
    return ContextCache({l: v.float() for l, v in cache.levels.items()}, cache.tokens.float(),
                        cache.pooled.float(), cache.task, cache.modality)
