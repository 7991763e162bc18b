"""Episode augmentation with MONAI transforms, applied consistently inside an episode.

Each transform is drawn once per episode and applied to every array of it in one call (the
arrays are stacked as channels): flips and quarter turns move images, targets and the prior
together; gamma (contrast) and Gaussian blur (a coarser acquisition) change every image of a
segmentation episode alike, so the pairs still show the query's appearance. Image-task episodes
only get the geometric part: their targets' intensities are the answer.
"""

from __future__ import annotations

import numpy as np
from monai.transforms import AdjustContrast, Flip, GaussianSmooth, Rotate90

from medgen.core.config import task_index

SEGMENT = task_index("segment")
SPATIAL = ("ctx_images", "ctx_targets", "query", "target", "prior", "prior_valid")


def augment(episode, rng: np.random.Generator):
    """The same episode, flipped / turned (p 0.5), and for segmentation gamma (p 0.3) and blur
    (p 0.2); arrays keep their shapes and dtypes."""
    arrays = {n: getattr(episode, n) for n in SPATIAL}
    stacked = np.concatenate([_flat(a) for a in arrays.values()]).astype(np.float32)
    if rng.random() < 0.5:
        stacked = np.asarray(Rotate90(k=int(rng.integers(0, 4)))(stacked))
        if rng.random() < 0.5:
            stacked = np.asarray(Flip(spatial_axis=int(rng.integers(0, 2)))(stacked))
    k = arrays["ctx_images"].shape[0]
    images = np.r_[0:k, 2 * k]  # the example images and the query, in stacked order
    if episode.task == SEGMENT and rng.random() < 0.3:
        gamma = float(np.exp(rng.uniform(-0.4, 0.4)))
        stacked[images] = np.asarray(AdjustContrast(gamma=gamma)(stacked[images]))
    if episode.task == SEGMENT and rng.random() < 0.2:
        sigma = float(rng.uniform(0.5, 1.5))
        stacked[images] = np.asarray(GaussianSmooth(sigma=sigma)(stacked[images]))
    return _unstack(episode, arrays, stacked)


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape((-1,) + a.shape[-2:])


def _unstack(episode, arrays: dict[str, np.ndarray], stacked: np.ndarray):
    i = 0
    for name, a in arrays.items():
        n = int(np.prod(a.shape[:-2])) if a.ndim > 2 else 1
        part = stacked[i:i + n].reshape(a.shape)
        setattr(episode, name, part > 0.5 if a.dtype == bool else part.astype(a.dtype))
        i += n
    return episode
