"""What the query's prior channel holds in an in-volume segmentation episode, and which slices
are the examples — drawn so that training sees every prior inference gives the model.

- "none": no prior (independent mode, the first step of a cross-subject run);
- "neighbour": a neighbouring slice's label, perturbed (autoregressive propagation, scheduled
  sampling: the model's own previous prediction is never exact), sometimes past the structure's
  end so chains learn to stop;
- "partial": the query's own target with blocks hidden (partial-target completion);
- "fill": Slicer's fill-between-slices result from the example slices (prior correction);
- "nearest": the nearest labelled slice, a few slices outside the labelled span.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medgen.core.grid import to_grid
from medgen.infer.interpolate import fill_between_slices

DEFAULT_PRIORS = {"none": 0.25, "neighbour": 0.3, "partial": 0.1, "fill": 0.25, "nearest": 0.1}


@dataclass
class Setup:
    query: int
    examples: np.ndarray  # slice indices of the k example pairs
    kind: str
    source: np.ndarray  # the prior as a full-slice mask (empty for "none" / "partial")
    view: np.ndarray  # where inference would centre the query's crop


class PriorSampler:
    def __init__(self, rng: np.random.Generator, weights: dict[str, float] | None = None) -> None:
        self.rng = rng
        self.weights = {**DEFAULT_PRIORS, **(weights or {})}

    def _kind(self, k: int) -> str:
        names = [n for n, w in self.weights.items() if w > 0 and not (n == "fill" and k < 2)]
        p = np.asarray([self.weights[n] for n in names], float)
        return names[int(self.rng.choice(len(names), p=p / p.sum()))]

    def choose(self, lab: np.ndarray, present: np.ndarray, k: int) -> Setup:
        """lab: slices-first boolean stack of one structure; present: the slices that hold it."""
        kind = self._kind(k)
        if kind == "fill":
            setup = self._fill(lab, present, k)
            if setup is not None:
                return setup
            kind = "neighbour"
        if kind == "nearest":
            return self._nearest(lab, present, k)
        return self._neighbour(lab, present, k, kind)

    def _neighbour(self, lab: np.ndarray, present: np.ndarray, k: int, kind: str) -> Setup:
        q = int(self.rng.choice(present))
        nb = int(np.clip(q + int(self.rng.choice([-1, 1])) * int(self.rng.integers(1, 4)), 0, len(lab) - 1))
        beyond = self._beyond_end(present, len(lab))
        if beyond is not None:  # a query past the structure's end: the answer is "nothing here"
            q, nb = beyond
        window = int(self.rng.integers(2, 40))
        near = present[(np.abs(present - q) <= window) & (present != q)]
        pool = near if near.size else present[present != q]
        examples = self.rng.choice(pool, size=k, replace=pool.size < k)
        source = lab[nb] if kind == "neighbour" else np.zeros_like(lab[q])
        return Setup(q, examples, kind, source, lab[nb])

    def _beyond_end(self, present: np.ndarray, n: int) -> tuple[int, int] | None:
        """Sometimes (20%) a slice 1-3 past either end of the structure, with that end slice as
        the neighbour: propagation must learn to stop, which queries on the structure never teach."""
        if self.rng.random() >= 0.2:
            return None
        d = int(self.rng.integers(1, 4))
        end, q = (int(present.max()), int(present.max()) + d) if self.rng.random() < 0.5 else (
            int(present.min()), int(present.min()) - d)
        return (q, end) if 0 <= q < n else None

    def _fill(self, lab: np.ndarray, present: np.ndarray, k: int) -> Setup | None:
        """k labelled slices on both sides of the query; the prior is their interpolation."""
        inner = present[(present > present.min()) & (present < present.max())]
        if inner.size == 0:
            return None
        q = int(self.rng.choice(inner))
        window = int(self.rng.integers(3, 30))
        left = present[(present < q) & (present >= q - window)]
        right = present[(present > q) & (present <= q + window)]
        left = left if left.size else present[present < q]
        right = right if right.size else present[present > q]
        a = int(self.rng.integers(1, k))
        examples = np.concatenate([self.rng.choice(left, size=a, replace=left.size < a),
                                   self.rng.choice(right, size=k - a, replace=right.size < k - a)])
        lo, hi = int(examples.min()), int(examples.max())
        given = sorted({int(s) - lo for s in examples})
        try:
            source = fill_between_slices(lab[lo:hi + 1], given)[q - lo]
        except RuntimeError:  # ITK refuses some shapes; the episode becomes a neighbour one
            return None
        return Setup(q, examples, "fill", source, source if source.any() else lab[int(examples[0])])

    def _nearest(self, lab: np.ndarray, present: np.ndarray, k: int) -> Setup:
        """The query lies a few slices outside the labelled span; the prior is the end slice."""
        up = self.rng.random() < 0.5
        end = int(self.rng.choice(present))
        side = present[present <= end] if up else present[present >= end]
        others = self.rng.choice(side, size=k - 1, replace=side.size < k - 1) if k > 1 else np.zeros(0, int)
        q = int(np.clip(end + (1 if up else -1) * int(self.rng.integers(1, 5)), 0, len(lab) - 1))
        return Setup(q, np.concatenate([[end], others]).astype(int), "nearest", lab[end], lab[end])

    def render(self, setup: Setup, target: np.ndarray, box, grid: int) -> tuple[np.ndarray, np.ndarray]:
        """The prior and its validity map on the query's grid (target: the query's grid target)."""
        ones = np.ones((grid, grid), np.float32)
        if setup.kind == "none":
            return np.zeros_like(ones), np.zeros_like(ones)
        if setup.kind == "partial":
            valid = ones.copy()
            n = grid // 4
            for _ in range(int(self.rng.integers(1, 4))):
                r0, c0 = self.rng.integers(0, grid - n, 2)
                valid[r0:r0 + n, c0:c0 + n] = 0
            return (target > 0.5).astype(np.float32) * valid, valid
        m = setup.source
        if setup.kind == "neighbour" and (it := int(self.rng.integers(0, 3))):
            op = ndimage.binary_dilation if self.rng.random() < 0.5 else ndimage.binary_erosion
            m = op(m, iterations=it)
        return (to_grid(m.astype(np.float32), box, grid) > 0.5).astype(np.float32), ones
