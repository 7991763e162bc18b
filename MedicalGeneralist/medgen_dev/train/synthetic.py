"""Synthetic segmentation tasks that only the examples can name (UniverSeg / SynthSeg style).

Real labelled data gives the model a handful of tasks, each recognisable from the modality
alone (ultrasound -> lesion, fundus -> vessels): it can score well without reading its pairs.
Here every episode invents a task: a random "anatomy" (a label map of smooth random regions), a
random appearance (per-region intensity and texture, blur, bias field, noise) and a random
region (or two) as the structure. Examples and query are independent random deformations of the
same anatomy, so their pixels are not aligned, and the structure to segment is known only from
the example targets. The modality index is drawn at random: it carries nothing either.

No library generates these (MONAI's synthetic helpers draw circles on one image, not families of
deformed label maps), so the few lines below use scipy.ndimage filters and resampling.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medgen.core.config import MODALITIES


class SyntheticTasks:
    def __init__(self, rng: np.random.Generator, grid: int) -> None:
        self.rng = rng
        self.grid = grid

    def pairs(self, k: int, tries: int = 8) -> tuple[np.ndarray, np.ndarray, int]:
        """k + 1 (image, target) pairs of one invented task: [k+1, S, S] float32 and bool, and a
        random modality index. The first pair is the query."""
        anatomy = self._anatomy()
        style = self._style(int(anatomy.max()) + 1)
        chosen = self._structure(anatomy)
        images, targets = [], []
        for _ in range(k + 1):
            for _ in range(tries):  # a deformation may push a small structure out of view
                labels = self._deform(anatomy)
                target = np.isin(labels, chosen)
                if target.sum() >= 16:
                    break
            images.append(self._render(labels, style))
            targets.append(target)
        return np.stack(images), np.stack(targets), int(self.rng.integers(len(MODALITIES)))

    def _anatomy(self) -> np.ndarray:
        """3-8 regions: the argmax of smooth random fields, so regions are blobs of varied size."""
        s, n = self.grid, int(self.rng.integers(3, 9))
        sigma = s / self.rng.uniform(5, 14)
        fields = ndimage.gaussian_filter(self.rng.standard_normal((n, s, s)), (0, sigma, sigma))
        fields *= self.rng.uniform(0.5, 1.5, (n, 1, 1))  # some regions larger than others
        labels = np.argmax(fields, 0).astype(np.int16)
        if self.rng.random() < 0.5:  # one compact object (a lesion, an organ) on top
            centre, radius = self.rng.uniform(0.25 * s, 0.75 * s, 2), self.rng.uniform(0.05, 0.2) * s
            yy, xx = np.mgrid[0:s, 0:s]
            wobble = ndimage.gaussian_filter(self.rng.standard_normal((s, s)), s / 16)
            dist = np.hypot(yy - centre[0], (xx - centre[1]) * self.rng.uniform(0.6, 1.6))
            labels[dist < radius * (1 + 3 * wobble / wobble.std() * 0.1)] = n
        return labels

    def _structure(self, anatomy: np.ndarray) -> list[int]:
        present = np.unique(anatomy)
        size = 2 if self.rng.random() < 0.2 and len(present) > 3 else 1
        return [int(v) for v in self.rng.choice(present, size=size, replace=False)]

    def _style(self, n: int) -> dict[str, np.ndarray | float]:
        return {"mean": self.rng.uniform(0, 1, n), "texture": self.rng.uniform(0, 0.15, n),
                "blur": float(self.rng.uniform(0, 1.5)), "noise": float(self.rng.uniform(0, 0.06)),
                "bias": float(self.rng.uniform(0, 0.3))}

    def _deform(self, labels: np.ndarray) -> np.ndarray:
        """A random affine (rotation, scale, shift) plus a smooth elastic field, nearest-neighbour."""
        s = self.grid
        angle, scale = self.rng.uniform(-0.3, 0.3), self.rng.uniform(0.85, 1.15)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) - s / 2
        coords = np.einsum("ij,jhw->ihw", rot, np.stack([yy, xx])) + s / 2
        coords += self.rng.uniform(-s / 12, s / 12, (2, 1, 1))
        field = ndimage.gaussian_filter(self.rng.standard_normal((2, s, s)), (0, s / 10, s / 10))
        coords += self.rng.uniform(0, s / 24) * field / field.std()
        return ndimage.map_coordinates(labels, coords, order=0, mode="nearest")

    def _render(self, labels: np.ndarray, style: dict) -> np.ndarray:
        s = self.grid
        mean = style["mean"][labels] + self.rng.normal(0, 0.03)  # a slightly different scanner
        texture = style["texture"][labels] * ndimage.gaussian_filter(self.rng.standard_normal((s, s)), 1.0) * 3
        image = ndimage.gaussian_filter(mean + texture, style["blur"]) if style["blur"] > 0.3 else mean + texture
        yy, xx = np.mgrid[0:s, 0:s] / s - 0.5
        tilt = self.rng.normal(0, 1, 2)
        image = image * (1 + style["bias"] * (tilt[0] * yy + tilt[1] * xx))
        image = image + self.rng.normal(0, style["noise"], (s, s))
        return image.astype(np.float32)

