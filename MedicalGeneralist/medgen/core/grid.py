"""Crop boxes and resampling between a slice's pixels and the model's square grid.

Small structures must be seen at high resolution: a 512x512 CT slice squeezed into 128x128 loses
a vessel or a lymph node. So segmentation works in a box around where the structure is expected
(its label in the examples, or the neighbouring slice's prediction) with a margin, square in
millimetres (anisotropic pixels, e.g. sagittal slices of thick-slice CT, are stretched to square
model pixels), resampled to the grid with MONAI's Resize and pasted back the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.layers import GaussianFilter

MARGIN = 0.6  # of the structure's extent, on each side
MIN_SIDE_MM = 24.0


@dataclass(frozen=True)
class Box:
    """A window on a slice in pixel coordinates; may reach outside the slice (zero padded)."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0


def full_box(shape: tuple[int, int], spacing: tuple[float, float]) -> Box:
    """The whole slice, padded to a square in millimetres."""
    side = max(shape[0] * spacing[0], shape[1] * spacing[1])
    return _square(shape[0] / 2, shape[1] / 2, side, spacing)


def box_around(mask: np.ndarray, spacing: tuple[float, float], margin: float = MARGIN,
               min_side_mm: float = MIN_SIDE_MM) -> Box | None:
    """A square (in mm) box around the mask's foreground with a margin; None if it is empty."""
    rows, cols = np.nonzero(np.any(mask, axis=1)), np.nonzero(np.any(mask, axis=0))
    if rows[0].size == 0:
        return None
    r0, r1, c0, c1 = rows[0][0], rows[0][-1] + 1, cols[0][0], cols[0][-1] + 1
    extent = max((r1 - r0) * spacing[0], (c1 - c0) * spacing[1])
    side = max(extent * (1 + 2 * margin), min_side_mm)
    full = max(mask.shape[0] * spacing[0], mask.shape[1] * spacing[1])
    return _square((r0 + r1) / 2, (c0 + c1) / 2, min(side, full), spacing)


def cap_box(box: Box, spacing: tuple[float, float], max_side_mm: float) -> Box:
    """The same box shrunk about its centre to at most max_side_mm (a leak cannot widen the view)."""
    if (box.r1 - box.r0) * spacing[0] <= max_side_mm:
        return box
    return _square((box.r0 + box.r1) / 2, (box.c0 + box.c1) / 2, max_side_mm, spacing)


def _square(rc: float, cc: float, side_mm: float, spacing: tuple[float, float]) -> Box:
    hr, hc = side_mm / spacing[0] / 2, side_mm / spacing[1] / 2
    r0, c0 = int(np.floor(rc - hr)), int(np.floor(cc - hc))
    return Box(r0, r0 + max(int(round(2 * hr)), 1), c0, c0 + max(int(round(2 * hc)), 1))


def crop(image: np.ndarray, box: Box, fill: float = 0.0) -> np.ndarray:
    """The box's pixels, padded with `fill` where the box leaves the slice."""
    out = np.full(box.shape, fill, dtype=np.float32)
    r0, r1 = max(box.r0, 0), min(box.r1, image.shape[0])
    c0, c1 = max(box.c0, 0), min(box.c1, image.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - box.r0:r1 - box.r0, c0 - box.c0:c1 - box.c0] = image[r0:r1, c0:c1]
    return out


def resize(patch: np.ndarray | torch.Tensor, shape: tuple[int, int], anti_aliasing: bool) -> np.ndarray:
    """MONAI's Resize (bilinear, anti-aliased along shrinking axes if asked) on one 2D patch, without its
    per-call MetaTensor bookkeeping, which cost more than the arithmetic on the propagation's
    hundreds of small crops (equality with MONAI's transform is tested)."""
    x = torch.as_tensor(patch, dtype=torch.float32)
    if tuple(x.shape) == tuple(shape):
        return x.numpy().copy()
    factors = [a / b for a, b in zip(x.shape, shape)]
    if anti_aliasing and any(f > 1 for f in factors):
        sigma = [max(0.0, (f - 1) / 2) for f in factors]
        x = GaussianFilter(2, sigma, approx="erf")(x[None, None])[0, 0]
    return torch.nn.functional.interpolate(x[None, None], size=tuple(shape), mode="bilinear")[0, 0].numpy()


def to_grid(image: np.ndarray, box: Box, size: int, fill: float = 0.0) -> np.ndarray:
    """Crop and resample to size x size (area-like anti-aliasing when shrinking)."""
    patch = crop(image, box, fill)
    return resize(patch, (size, size), anti_aliasing=patch.shape[0] > size)


def from_grid(patch: torch.Tensor | np.ndarray, box: Box, shape: tuple[int, int],
              fill: float = 0.0) -> np.ndarray:
    """Resample a grid patch back to the box and paste it into a slice of `shape`."""
    resized = resize(patch, box.shape, anti_aliasing=False)
    out = np.full(shape, fill, dtype=np.float32)
    r0, r1 = max(box.r0, 0), min(box.r1, shape[0])
    c0, c1 = max(box.c0, 0), min(box.c1, shape[1])
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = resized[r0 - box.r0:r1 - box.r0, c0 - box.c0:c1 - box.c0]
    return out


def structure_width(mask: np.ndarray) -> float:
    """Typical width in pixels of a mask's structures: twice the mean distance to background.

    A vessel tree is a few pixels wide however large the image; a lesion is wide. The width decides
    how finely a whole image must be sampled for the structure to survive on the model grid.
    """
    from scipy import ndimage

    if not mask.any():
        return float("inf")
    return float(2 * ndimage.distance_transform_edt(mask)[mask].mean())


def working_side(width_fractions: list[float], long_side: int, grid: int, min_px: float = 3.0,
                 multiple: int = 16) -> int:
    """Side of the square whole-image grid: `grid`, or finer until thin structures keep min_px.

    width_fractions: structure widths as fractions of their own image's long side (examples may
    differ in size); long_side caps the side at native resolution, 4 x grid caps the cost.
    """
    finite = [w for w in width_fractions if np.isfinite(w) and w > 0]
    if not finite or float(np.median(finite)) * grid >= min_px:
        return grid
    side = min(min_px / float(np.median(finite)), long_side, 4 * grid)
    return int(max(grid, round(side / multiple) * multiple))
