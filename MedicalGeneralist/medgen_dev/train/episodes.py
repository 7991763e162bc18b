"""Training episodes: k context pairs + one query, for every task, drawn from real cases.

One episode is what the user does in Slicer, in miniature: segmentation pairs are other slices of
the same volume (propagation, as in MVG) or other images of the same kind (cross-subject, as in
UniverSeg); image tasks pair a degraded slice with the clean one. The query's prior channel is
filled the way inference fills it (a neighbour slice's label, perturbed; known pixels around an
inpainting hole), so the model learns to correct a prior rather than copy it.
Crops follow inference exactly (grid.box_around / grid.to_grid), so train and test see one scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medgen_dev.train.augment import augment
from medgen.core.config import MODALITIES, modality_index, task_index
from medgen_dev.train.datasets import Case
from medgen.infer.imagetasks import classical_denoise, classical_fill, example_denoise, linear_start
from medgen.core.grid import Box, box_around, crop, full_box, structure_width, to_grid, working_side
from medgen_dev.train.priors import PriorSampler
from medgen_dev.train.pseudotasks import Supervoxels
from medgen_dev.train.synthetic import SyntheticTasks

DEFAULT_TASKS = {"segment3d": 0.3, "pseudo3d": 0.08, "segment2d": 0.1, "synthetic": 0.14,
                 "denoise": 0.13, "inpaint": 0.12, "synthesize": 0.13, "twins3d": 0.0}
BLIND_MODALITY = 0.25  # share of real segmentation episodes whose modality index is drawn at random
SEGMENT_TASK = task_index("segment")


@dataclass
class Episode:
    ctx_images: np.ndarray  # [k, S, S]
    ctx_targets: np.ndarray  # [k, S, S]
    query: np.ndarray  # [S, S]
    target: np.ndarray  # [S, S]
    prior: np.ndarray  # [S, S]
    prior_valid: np.ndarray  # [S, S]
    task: int
    modality: int


class EpisodeSampler:
    """Draws task-mixed episodes; every batch mixes tasks so the model cannot ignore its pairs."""

    def __init__(self, cases: list[Case], grid: int, weights: dict[str, float] | None = None,
                 seed: int = 0, priors: dict[str, float] | None = None, augment: bool = True,
                 blind_modality: float = BLIND_MODALITY, denoise_inputs: str = "slice-nlm") -> None:
        self.rng = np.random.default_rng(seed)
        self.augment = augment
        self.priors = PriorSampler(self.rng, priors)
        self.pseudo = Supervoxels()
        self.synthetic = SyntheticTasks(self.rng, grid)
        self.grid = grid
        self.vol_seg = [c for c in cases if c.labels is not None and not c.is_2d]
        self.flat_seg: dict[str, list[Case]] = {}
        for c in cases:
            if c.is_2d and c.labels is not None:
                self.flat_seg.setdefault(c.name.split("/")[0], []).append(c)
        self.vols = [c for c in cases if not c.is_2d]
        self.images = cases
        self.multi_contrast = [c for c in cases if len(c.contrasts) > 1]
        self.weights = {**DEFAULT_TASKS, **(weights or {})}
        self.blind_modality = blind_modality
        self.denoise_inputs = denoise_inputs  # the model's (ModelConfig.denoise_inputs)
        self._presence: dict[tuple[str, int, int], np.ndarray] = {}

    # -- helpers ----------------------------------------------------------------------------
    def _slices_with(self, name: str, labels: np.ndarray, label: int, axis: int) -> np.ndarray:
        key = (name, label, axis)
        if key not in self._presence:
            mask = labels == label
            self._presence[key] = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        return self._presence[key]

    def _axis(self, case: Case) -> int:
        """Any axis for near-isotropic volumes; the thick axis for thick-slice ones (as acquired)."""
        sp = np.asarray(case.spacing)
        if sp.max() / sp.min() > 2:
            return int(np.argmax(sp))
        return int(self.rng.integers(3))

    def _spacing2d(self, case: Case, axis: int) -> tuple[float, float]:
        sp = [case.spacing[a] for a in range(3) if a != axis]
        return sp[0], sp[1]

    def _jitter_box(self, mask: np.ndarray, spacing: tuple[float, float]):
        return box_around(mask, spacing, margin=float(self.rng.uniform(0.3, 1.0)))

    # -- tasks ------------------------------------------------------------------------------
    def sample(self, k: int) -> Episode:
        return self.group(k)[0]

    def batch(self, k: int, n: int) -> list[Episode]:
        """n episodes; twins (twins3d) stay side by side in the batch, so that one gradient step
        sees the same images with two targets."""
        out: list[Episode] = []
        while len(out) < n:
            out += self.group(k)
        return out[:n]

    def group(self, k: int) -> list[Episode]:
        """One episode, or two twins: every array drawn once, augmented alike."""
        names = [n for n, w in self.weights.items() if w > 0]
        p = np.asarray([self.weights[n] for n in names], dtype=float)
        name = names[int(self.rng.choice(len(names), p=p / p.sum()))]
        drawn = getattr(self, f"_{name}")(k)
        episodes = drawn if isinstance(drawn, list) else [drawn]
        if self.augment and episodes[0].task == SEGMENT_TASK and self.rng.random() < self.blind_modality:
            # the modality alone names the task on real data (ultrasound -> lesion): hide it
            # sometimes so that the examples must carry it
            modality = int(self.rng.integers(len(MODALITIES)))
            for e in episodes:
                e.modality = modality
        if not self.augment:
            return episodes
        seed = int(self.rng.integers(1 << 31))
        return [augment(e, np.random.default_rng(seed)) for e in episodes]

    def _twins3d(self, k: int) -> list[Episode] | Episode:
        """The same example slices and query, cropped alike, with two different structures of
        one label map as the target (liver / spleen, grey / white matter, tumour sub-regions),
        no prior: only the example targets tell the twins apart, which a model that recognises
        the image and answers its usual structure cannot do (the bench's ambiguity test)."""
        multi = [c for c in self.vol_seg if len(self._values(c)) > 1]
        if not multi:
            return self._segment3d(k)
        case = multi[int(self.rng.integers(len(multi)))]
        axis = self._axis(case)
        lab = np.moveaxis(case.labels, axis, 0)
        values = self._values(case)
        a = int(self.rng.choice(values))
        on = lambda v: self._slices_with(case.name, case.labels, v, axis)
        shared = {v: both for v in values if v != a and (both := np.intersect1d(on(a), on(v))).size > 1}
        if not shared:
            return self._segment3d(k)
        b = int(self.rng.choice(list(shared)))
        picks = self.rng.choice(shared[b], size=k + 1, replace=shared[b].size < k + 1)
        img, sp = np.moveaxis(self._any_contrast(case), axis, 0), self._spacing2d(case, axis)
        boxes = [self._jitter_box(np.isin(lab[s], (a, b)), sp) for s in picks]
        images = np.stack([to_grid(img[s], box, self.grid) for s, box in zip(picks, boxes)])
        z = np.zeros((self.grid, self.grid), np.float32)
        twins = []
        for v in (a, b):
            t = np.stack([to_grid((lab[s] == v).astype(np.float32), box, self.grid) for s, box in zip(picks, boxes)])
            twins.append(Episode(images[1:], t[1:] > 0.5, images[0], t[0] > 0.5, z, z, SEGMENT_TASK,
                                 modality_index(case.modality)))
        return twins

    def _values(self, case: Case) -> list[int]:
        """A case's label values (cached: np.unique over a whole volume is not cheap per draw)."""
        key = ("values", case.name)
        if key not in self._presence:
            self._presence[key] = [int(v) for v in np.unique(case.labels) if v != 0]
        return self._presence[key]

    def _synthetic(self, k: int) -> Episode:
        """An invented task (synthetic.py): unaligned examples are the only way to know it."""
        images, targets, modality = self.synthetic.pairs(k)
        z = np.zeros_like(images[0])
        return Episode(images[1:], targets[1:], images[0], targets[0], z, z, SEGMENT_TASK, modality)

    def _segment3d(self, k: int) -> Episode:
        """Co-registered contrasts (BraTS) take turns as the image: users outline tumour
        sub-regions on FLAIR or T1c as often as on T1, and one label map seen through several
        contrasts says that the examples, not the contrast, decide what to segment."""
        case = self.vol_seg[int(self.rng.integers(len(self.vol_seg)))]
        return self._in_volume(case, case.labels, case.name, k, image=self._any_contrast(case))

    def _any_contrast(self, case: Case) -> np.ndarray:
        """One of a case's co-registered contrasts, drawn (its image when it has none)."""
        return case.contrasts[str(self.rng.choice(sorted(case.contrasts)))] if case.contrasts else case.image

    def _pseudo3d(self, k: int) -> Episode:
        """A supervoxel as the structure (pseudotasks.py): every volume, labelled or not."""
        case = self.vols[int(self.rng.integers(len(self.vols)))]
        regions = self.pseudo.regions(case)
        return self._in_volume(case, regions, "pseudo:" + case.name, k)

    def _in_volume(self, case: Case, labels: np.ndarray, key: str, k: int, tries: int = 5,
                   image: np.ndarray | None = None) -> Episode:
        """Examples are other slices of the same volume, as in Slicer; the prior channel holds
        what inference puts there (priors.py): nothing, the neighbour's label, a partial target,
        the fill-between-slices result, or the nearest labelled slice."""
        values = [int(v) for v in np.unique(labels) if v != 0]
        label = int(self.rng.choice(values))
        axis = self._axis(case)
        present = self._slices_with(key, labels, label, axis)
        if present.size < 2:  # a structure on one slice cannot be propagated: draw another
            return self._in_volume(case, labels, key, k, tries - 1, image) if tries else self._segment3d(k)
        img = np.moveaxis(case.image if image is None else image, axis, 0)
        lab = np.moveaxis(labels, axis, 0) == label
        setup = self.priors.choose(lab, present, k)
        sp = self._spacing2d(case, axis)
        qbox = self._jitter_box(setup.view if setup.view.any() else lab[setup.query], sp)
        ci, ct = [], []
        for s in setup.examples:
            box = self._jitter_box(lab[s], sp)
            ci.append(to_grid(img[s], box, self.grid))
            ct.append(to_grid(lab[s].astype(np.float32), box, self.grid))
        qt = to_grid(lab[setup.query].astype(np.float32), qbox, self.grid)
        prior, valid = self.priors.render(setup, qt, qbox, self.grid)
        return Episode(np.stack(ci), np.stack(ct) > 0.5, to_grid(img[setup.query], qbox, self.grid),
                       qt > 0.5, prior, valid, task_index("segment"), modality_index(case.modality))

    def _segment2d(self, k: int) -> Episode:
        """Cross-subject 2D episodes at the scale inference uses (grid.working_side): thin
        structures are seen finely sampled, through grid-sized windows on foreground."""
        group = list(self.flat_seg)[int(self.rng.integers(len(self.flat_seg)))]
        cases = self.flat_seg[group]
        picks = self.rng.choice(len(cases), size=k + 1, replace=len(cases) < k + 1)
        side = working_side([self._width_fraction(cases[int(i)]) for i in picks],
                            max(cases[int(picks[0])].image.shape[1:]), self.grid)
        imgs, tgts = [], []
        for i in picks:
            c = cases[int(i)]
            box = full_box(c.image.shape[1:], c.spacing[1:])
            img = to_grid(c.image[0], box, side)
            tgt = to_grid((c.labels[0] > 0).astype(np.float32), box, side) > 0.5
            window = self._window_on(tgt, side)
            imgs.append(crop(img, window))
            tgts.append(crop(tgt.astype(np.float32), window) > 0.5)
        z = np.zeros((self.grid, self.grid), np.float32)
        return Episode(np.stack(imgs[1:]), np.stack(tgts[1:]), imgs[0], tgts[0], z, z,
                       task_index("segment"), modality_index(cases[0].modality))

    def _width_fraction(self, case: Case) -> float:
        key = ("width", case.name)
        if key not in self._presence:
            self._presence[key] = structure_width(case.labels[0] > 0) / max(case.labels.shape[1:])
        return self._presence[key]

    def _window_on(self, mask: np.ndarray, side: int) -> Box:
        """The whole grid when the image fits it, else a grid window around a foreground pixel."""
        g = self.grid
        if side <= g:
            return Box(0, g, 0, g)
        fg = np.argwhere(mask)
        centre = fg[int(self.rng.integers(len(fg)))] if len(fg) else np.array([side // 2, side // 2])
        r0, c0 = (np.clip(centre + self.rng.integers(-g // 3, g // 3 + 1, 2) - g // 2, 0, side - g)).astype(int)
        return Box(int(r0), int(r0) + g, int(c0), int(c0) + g)

    def _native_crops(self, case: Case, n: int, arrays: list[np.ndarray]) -> list[list[np.ndarray]]:
        """n random native-resolution grid-sized crops from random slices, same place in each array."""
        axis = 0 if case.is_2d else self._axis(case)
        out = []
        for _ in range(n):
            views = [np.moveaxis(a, axis, 0) for a in arrays]
            lo, hi = int(views[0].shape[0] * 0.15), max(int(views[0].shape[0] * 0.85), 1)
            s = int(self.rng.integers(lo, hi)) if hi > lo else 0
            h, w = views[0].shape[1:]
            r0 = int(self.rng.integers(min(0, h - self.grid), max(h - self.grid, 0) + 1))
            c0 = int(self.rng.integers(min(0, w - self.grid), max(w - self.grid, 0) + 1))
            box = Box(r0, r0 + self.grid, c0, c0 + self.grid)
            out.append([crop(v[s], box) for v in views])
        return out

    def _denoise(self, k: int) -> Episode:
        case = self.images[int(self.rng.integers(len(self.images)))]
        level = float(self.rng.uniform(0.03, 0.15))
        crops = [c[0] for c in self._native_crops(case, k + 1, [case.image])]
        noisy = [self._noise(c, case.modality, level) for c in crops]
        z = np.zeros_like(crops[0])
        prior, valid = z, z
        if self.denoise_inputs.startswith("tuned-nlm"):  # as inference gives them (imagetasks)
            query = example_denoise(np.stack(noisy[1:]), np.stack(crops[1:]))(noisy[0][None])[0]
            if self.denoise_inputs.endswith("+noisy"):
                prior, valid = noisy[0], np.ones_like(z)
        else:
            query = classical_denoise(noisy[0][None])[0]
        return Episode(np.stack(noisy[1:]), np.stack(crops[1:]), query, crops[0], prior, valid,
                       task_index("denoise"), modality_index(case.modality))

    def _noise(self, x: np.ndarray, modality: str, level: float) -> np.ndarray:
        """Modality-typical noise: Rician (MR), speckle (US), Poisson-like (CT), Gaussian (other)."""
        g = self.rng.standard_normal((2,) + x.shape).astype(np.float32) * level
        if modality == "mr":
            return np.sqrt((x + g[0]) ** 2 + g[1] ** 2)
        if modality == "us":
            return x * (1 + g[0] * 2)
        if modality == "ct":
            return x + g[0] * np.sqrt(np.clip(x, 0.05, None))
        return x + g[0]

    def _hole(self) -> np.ndarray:
        """A box or a free-form stroke, the masked-image-modelling half of the objective."""
        s = self.grid
        m = np.zeros((s, s), bool)
        if self.rng.random() < 0.5:
            h, w = self.rng.integers(s // 8, s // 3, 2)
            r0, c0 = self.rng.integers(0, s - h), self.rng.integers(0, s - w)
            m[r0:r0 + h, c0:c0 + w] = True
        else:
            p = self.rng.uniform(s * 0.2, s * 0.8, 2)
            for _ in range(int(self.rng.integers(10, 40))):
                p = np.clip(p + self.rng.normal(0, 4, 2), 0, s - 1)
                m[int(p[0]), int(p[1])] = True
            m = ndimage.binary_dilation(m, iterations=int(self.rng.integers(3, 8)))
        return m.astype(np.float32)

    def _inpaint(self, k: int) -> Episode:
        case = self.images[int(self.rng.integers(len(self.images)))]
        crops = [c[0] for c in self._native_crops(case, k + 1, [case.image])]
        holes = [self._hole() for _ in crops]
        masked = [c * (1 - h) for c, h in zip(crops, holes)]
        query = classical_fill(masked[0][None], holes[0][None] > 0)[0]  # as inference does
        return Episode(np.stack(masked[1:]), np.stack(crops[1:]), query, crops[0], masked[0],
                       1 - holes[0], task_index("inpaint"), modality_index(case.modality))

    def _synthesize(self, k: int) -> Episode:
        case = self.multi_contrast[int(self.rng.integers(len(self.multi_contrast)))]
        src, dst = self.rng.choice(list(case.contrasts), size=2, replace=False)
        pairs = self._native_crops(case, k + 1, [case.contrasts[src], case.contrasts[dst]])
        z = np.zeros_like(pairs[0][0])
        ctx_x, ctx_y = np.stack([p[0] for p in pairs[1:]]), np.stack([p[1] for p in pairs[1:]])
        query = linear_start(ctx_x, ctx_y)(pairs[0][0])  # as inference starts it
        return Episode(ctx_x, ctx_y, query, pairs[0][1], z, z, task_index("synthesize"),
                       modality_index(case.modality))


def collate(episodes: list[Episode]) -> dict[str, "np.ndarray"]:
    """Stack episodes into model-ready float32 arrays ([B, k, 1, S, S] and [B, 1, S, S])."""
    f = lambda name: np.stack([getattr(e, name) for e in episodes]).astype(np.float32)
    return {"ctx_images": f("ctx_images")[:, :, None], "ctx_targets": f("ctx_targets")[:, :, None],
            "query": f("query")[:, None], "target": f("target")[:, None], "prior": f("prior")[:, None],
            "prior_valid": f("prior_valid")[:, None],
            "task": np.asarray([e.task for e in episodes]), "modality": np.asarray([e.modality for e in episodes])}
