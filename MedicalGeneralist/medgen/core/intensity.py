"""Robust intensity normalisation that can be undone, so image outputs return in input units.

CT in Hounsfield units gets a fixed window, meaningful and the same across scanners; MR,
ultrasound, X-ray and photographs are in arbitrary units, so their range is taken from
percentiles of the whole volume (not per slice, which would make neighbouring slices disagree).
Many CT files are not in HU (raw stored values 0..4095 without the rescale, i.e. HU + 1024, or
linear attenuation coefficients around 0.02/mm): a HU window would map them to a constant and
destroy them. Each CT volume is therefore checked (`looks_like_hu`) and, when its values are not
HU, normalised from its own percentiles like any other modality; outputs are mapped back with the
same normaliser, so they always come back in the input's units.
Segmentation inputs are clipped to the window; image-task inputs are scaled but never clipped, so
that a denoised or synthesised value outside the window is not lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (-160.0, 240.0),
    "lung": (-1350.0, 150.0),
    "bone": (-450.0, 1050.0),
    "brain": (0.0, 80.0),
    "wide": (-1000.0, 1000.0),
}
DEFAULT_CT_WINDOW = "wide"
PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Normalizer:
    """Affine map of [lo, hi] onto [0, 1]; `clip` only for segmentation inputs."""

    lo: float
    hi: float
    clip: bool = False

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = ((np.asarray(x, dtype=np.float32) - self.lo) / (self.hi - self.lo)).astype(np.float32)
        return np.clip(y, 0.0, 1.0) if self.clip else y

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, dtype=np.float32) * (self.hi - self.lo) + self.lo).astype(np.float32)


def fit_normalizer(array: np.ndarray, modality: str, clip: bool = False,
                   window: str | None = None) -> Normalizer:
    """Choose the range from the modality: a CT window in HU, percentiles otherwise."""
    if modality == "ct" and looks_like_hu(array):
        lo, hi = CT_WINDOWS[window or DEFAULT_CT_WINDOW]
        return Normalizer(lo, hi, clip)
    sample = np.asarray(array)
    if sample.size > 4_000_000:  # percentiles of a strided sample: same answer, a tenth of the time
        sample = sample.reshape(-1)[:: sample.size // 2_000_000]
    lo, hi = (float(v) for v in np.percentile(sample, PERCENTILES))
    if hi - lo < 1e-6:
        lo, hi = float(sample.min()), float(sample.max())
    if hi - lo < 1e-6:
        hi = lo + 1.0
    return Normalizer(lo, hi, clip)


def looks_like_hu(array: np.ndarray) -> bool:
    """True when a CT's values are Hounsfield units: something below -50 HU (fat, air or the
    outside-of-field padding of -1024/-2048/-3024) and a median that is tissue or air in HU.

    Stored values without the rescale (HU + 1024) and attenuation coefficients have no negative
    values; a crop of pure soft tissue in HU also fails the test and then gets the percentile
    normalisation, which is the safe side: it never maps the volume to a constant.
    """
    sample = np.asarray(array).reshape(-1)
    if sample.size > 4_000_000:
        sample = sample[:: sample.size // 2_000_000]
    if sample.dtype.kind not in "iuf" or sample.size == 0:
        return False
    low, median = (float(v) for v in np.percentile(sample, (0.5, 50)))
    return low < -50 and -1100 <= median <= 400


def guess_modality(array: np.ndarray) -> str:
    """'ct' when values look like Hounsfield units (air near -1000), else 'other'.

    Only a guess for when the user gives no --modality; the CLI prints what it used.
    """
    if array.dtype.kind in "if" and float(np.min(array)) <= -500 and float(np.max(array)) > 100:
        return "ct"
    return "other"
