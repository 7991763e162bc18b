"""Self-supervised segmentation pseudo-tasks: supervoxels as structures, on every volume.

Labels exist for a few structures of a few modalities; supervoxels (scikit-image SLIC) exist on
every image, so the model learns to follow its examples, not to recognise known organs. SLIC runs
once per volume (lazily, cached in memory) at up to 128 voxels a side, so the two CPU cores
train instead of clustering.
"""

from __future__ import annotations

import numpy as np
from skimage.segmentation import slic

from medgen_dev.train.datasets import Case

MAX_SIDE = 128


class Supervoxels:
    def __init__(self, segments: int = 48) -> None:
        self.segments = segments
        self._cache: dict[str, np.ndarray] = {}

    def regions(self, case: Case) -> np.ndarray:
        if case.name not in self._cache:
            self._cache[case.name] = self._compute(case)
        return self._cache[case.name]

    def _compute(self, case: Case) -> np.ndarray:
        step = [max(1, int(np.ceil(n / MAX_SIDE))) for n in case.image.shape]
        small = case.image[::step[0], ::step[1], ::step[2]]
        mask = small > np.percentile(small, 30)  # no supervoxels in the air around the body
        labels = slic(small, n_segments=self.segments, compactness=0.1, channel_axis=None,
                      spacing=[s * f for s, f in zip(case.spacing, step)], mask=mask, start_label=1)
        for axis, f in enumerate(step):
            labels = np.repeat(labels, f, axis=axis)
        return np.ascontiguousarray(labels[:case.image.shape[0], :case.image.shape[1],
                                           :case.image.shape[2]]).astype(np.int16)
