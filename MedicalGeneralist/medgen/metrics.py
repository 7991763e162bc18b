"""The project's one set of quality measures: Dice and HD95 (MONAI), PSNR and SSIM (scikit-image).

The demo, the benchmark, the model card and the tests all score through these functions, so a
figure means the same thing wherever it is printed. Binary inputs: anything > 0 is foreground.
"""

from __future__ import annotations

import numpy as np


def _as_mask_tensor(a: np.ndarray):
    import torch

    return torch.as_tensor(np.ascontiguousarray(np.asarray(a) > 0))[None, None].float()


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty (nothing to find, nothing found)."""
    from monai.metrics import compute_dice

    return float(compute_dice(_as_mask_tensor(pred), _as_mask_tensor(truth), include_background=True,
                              ignore_empty=False)[0, 0])


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """95th-percentile Hausdorff distance (mm). An empty prediction (or truth) has no surface:
    the distance is then the diagonal of the scored region, so every figure stays finite."""
    from monai.metrics import compute_hausdorff_distance

    spacing = list(spacing or [1.0] * np.ndim(pred))
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(np.shape(pred), spacing))))
    p, t = _as_mask_tensor(pred), _as_mask_tensor(truth)
    if not p.any() or not t.any():
        return diagonal
    hd = float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)[0, 0])
    return hd if np.isfinite(hd) else diagonal


def seg_scores(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None,
               with_hd95: bool = True) -> dict:
    """Dice (and HD95) of one binary prediction, plus whether the prediction was empty."""
    out = {"dice": dice(pred, truth), "empty": not bool(np.any(np.asarray(pred) > 0))}
    if with_hd95:
        out["hd95"] = hd95(pred, truth, spacing)
    return out


def psnr(pred: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> float:
    """PSNR (dB) over all given values; data range defaults to the reference's range."""
    from skimage.metrics import peak_signal_noise_ratio

    ref, pred = np.asarray(ref, np.float64), np.asarray(pred, np.float64)
    rng = data_range if data_range is not None else (float(ref.max() - ref.min()) or 1.0)
    if np.array_equal(ref, pred):
        return float("inf")
    return float(peak_signal_noise_ratio(ref, pred, data_range=rng))


def image_scores(pred: np.ndarray, ref: np.ndarray, region: np.ndarray) -> dict:
    """PSNR over the scored voxels (pooled over slices) and SSIM averaged over the scored voxels
    of each slice's SSIM map; data range = the reference's range in the region. (slices, H, W)."""
    from skimage.metrics import structural_similarity

    ref, pred = ref.astype(np.float64), pred.astype(np.float64)
    rng = float(ref[region].max() - ref[region].min()) or 1.0
    ssim = [structural_similarity(r, p, data_range=rng, full=True)[1][m].mean()
            for r, p, m in zip(ref, pred, region) if m.any()]
    return {"psnr": psnr(pred[region], ref[region], rng), "ssim": float(np.mean(ssim))}
