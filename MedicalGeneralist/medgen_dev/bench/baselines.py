"""The tools users already have, as `medgen bench` runs them beside the model.

Every baseline is library code (ITK, SimpleITK, scikit-image, MONAI); this module only feeds them.
Where a baseline has a parameter (NL-means h, TV weight) it is chosen on the same example pairs
the model is given, never on the scored slices, so both sides see the same information.
Propagation baselines take slices-first arrays (slice axis 0) and {slice index: 2D mask}.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

PROPAGATION_BASELINES = ("nearest slice copy", "fill between slices (ITK MCI)", "registration (SimpleITK demons)")
CROSS_BASELINES = ("mean of example masks", "multi-atlas (affine + majority vote)")


# -- in-volume propagation ------------------------------------------------------------------------
def copy_nearest(labels: np.ndarray, given: list[int]) -> np.ndarray:
    """Every slice takes the labels of the nearest labelled slice (the demo's baseline)."""
    from medgen.infer.classical import nearest_copy

    return nearest_copy(labels, given) > 0


def fill_between_slices(labels: np.ndarray, given: list[int]) -> np.ndarray:
    """ITK's MorphologicalContourInterpolator (Slicer's "Fill between slices"), default settings,
    along the slice axis (interpolate.py; the model's own prior between labelled slices)."""
    from medgen.infer.interpolate import fill_between_slices as fill

    return fill(labels > 0, given)


def registration_propagate(slices: np.ndarray, given: dict[int, np.ndarray],
                           spacing: tuple[float, float], iterations: int = 40) -> np.ndarray:
    """Slice-to-slice deformable registration (SimpleITK fast symmetric forces demons) carries each
    labelled slice's mask outward, slice by slice; between two labelled slices both directions run
    and are blended linearly by distance. Open ends stop when the carried mask vanishes.
    Registration runs on a box around the labels with a margin (whole 512^2 CT slices would only
    add background to match)."""
    n = slices.shape[0]
    box = _label_box(list(given.values()), slices.shape[1:])
    crops = slices[:, box[0], box[1]].astype(np.float32)
    acc = np.zeros(crops.shape, np.float32)
    wsum = np.zeros(n, np.float32)
    idx = sorted(given)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(1.5)
    for origin, step, end, span in _chains(idx, n):
        mask = given[origin][box[0], box[1]].astype(np.float32)
        for s in range(origin + step, end, step):
            mask = (_warp(demons, crops[s], crops[s - step], mask, spacing) >= 0.5).astype(np.float32)
            w = 1.0 if span is None else max(1e-3, 1 - abs(s - origin) / span)
            acc[s] += w * mask
            wsum[s] += w
            if span is None and mask.max() < 0.5:
                break
    out = np.zeros(slices.shape, bool)
    out[:, box[0], box[1]] = acc / np.maximum(wsum, 1e-6)[:, None, None] >= 0.5
    for s, m in given.items():
        out[s] = m > 0
    return out


def _chains(idx: list[int], n: int) -> list[tuple[int, int, int, int | None]]:
    """(origin, step, end exclusive, span for blending or None for an open end)."""
    chains = [(idx[0], -1, -1, None), (idx[-1], 1, n, None)]
    for a, b in zip(idx[:-1], idx[1:]):
        chains += [(a, 1, b, b - a), (b, -1, a, b - a)]
    return chains


def _label_box(masks: list[np.ndarray], shape: tuple[int, int], margin: float = 0.5,
               pad: int = 16) -> tuple[slice, slice]:
    union = np.any(np.stack(masks), axis=0)
    out = []
    for ax in (0, 1):
        idx = np.nonzero(union.any(1 - ax))[0]
        extra = int((idx[-1] - idx[0] + 1) * margin) + pad
        out.append(slice(max(int(idx[0]) - extra, 0), min(int(idx[-1]) + 1 + extra, shape[ax])))
    return out[0], out[1]


def _warp(demons, fixed: np.ndarray, moving: np.ndarray, mask: np.ndarray,
          spacing: tuple[float, float]) -> np.ndarray:
    """Register `moving` (the previous slice) onto `fixed` and carry its mask across."""
    f, m, lab = (_sitk2d(a, spacing) for a in (fixed, moving, mask))
    field = demons.Execute(f, m)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.GetArrayFromImage(sitk.Resample(lab, f, transform, sitk.sitkLinear, 0.0))


def _sitk2d(array: np.ndarray, spacing: tuple[float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((float(spacing[1]), float(spacing[0])))
    return image


# -- cross-subject 2D ------------------------------------------------------------------------------
def mean_of_masks(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Prior: the example masks resized to the query (MONAI Resize) and averaged, >= 0.5."""
    from monai.transforms import Resize

    resize = Resize(shape, mode="nearest")
    stack = [np.asarray(resize((m > 0)[None].astype(np.float32)))[0] for m in masks]
    return np.mean(stack, axis=0) >= 0.5


def atlas_register(query: np.ndarray, atlas: np.ndarray, atlas_mask: np.ndarray,
                   seed: int = 0) -> np.ndarray:
    """Affine registration of one example image onto the query (Mattes mutual information,
    three resolutions) and its mask resampled with nearest neighbour: one atlas of a multi-atlas."""
    fixed, moving = _sitk2d(_unit(query), (1, 1)), _sitk2d(_unit(atlas), (1, 1))
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(2),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed + 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 80)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    try:
        transform = reg.Execute(fixed, moving)
    except RuntimeError:  # a failed optimisation keeps the initial (centred) transform
        transform = init
    warped = sitk.Resample(_sitk2d((atlas_mask > 0).astype(np.float32), (1, 1)), fixed, transform,
                           sitk.sitkNearestNeighbor, 0.0)
    return sitk.GetArrayFromImage(warped) > 0.5


def majority_vote(warped: list[np.ndarray]) -> np.ndarray:
    """SimpleITK LabelVoting of the registered atlas masks; ties go to background."""
    images = [sitk.GetImageFromArray(m.astype(np.uint8)) for m in warped]
    return sitk.GetArrayFromImage(sitk.LabelVoting(images, 0)) == 1


def _unit(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, (0.5, 99.5))
    return np.clip((a.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)


# -- image tasks -----------------------------------------------------------------------------------
NLM_FACTORS = (0.4, 0.6, 0.8, 1.0, 1.2)  # h in units of the noise sigma
TV_WEIGHTS = (0.02, 0.05, 0.1, 0.2)


def nl_means(noisy: np.ndarray, h: float, sigma: float) -> np.ndarray:
    """scikit-image non-local means (fast mode, 5x5 patches, 13x13 search) on a normalised slice."""
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(noisy, h=h * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                            fast_mode=True, preserve_range=True)


def noise_sigma(noisy: list[np.ndarray], clean: list[np.ndarray]) -> float:
    """The noise level the example pairs show (std of noisy - clean): what NL-means needs to know."""
    return float(np.std(np.concatenate([(x - y).ravel() for x, y in zip(noisy, clean)])))


def tv(noisy: np.ndarray, weight: float) -> np.ndarray:
    """scikit-image total-variation (Chambolle) denoising on a normalised slice."""
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(noisy, weight=weight)


def pick_parameter(fn, grid, noisy: list[np.ndarray], clean: list[np.ndarray]) -> float:
    """The grid value with the lowest error on the example pairs (the model's context)."""
    err = [np.mean([np.mean((fn(x, p) - y) ** 2) for x, y in zip(noisy, clean)]) for p in grid]
    return float(grid[int(np.argmin(err))])


def biharmonic(image: np.ndarray, hole: np.ndarray, pad: int = 12) -> np.ndarray:
    """scikit-image biharmonic inpainting, solved on a box around the hole (same answer inside
    the hole as the whole slice, a fraction of the sparse solve)."""
    from skimage.restoration import inpaint_biharmonic

    rows, cols = np.nonzero(hole.any(1))[0], np.nonzero(hole.any(0))[0]
    if rows.size == 0:
        return image.copy()
    r = slice(max(rows[0] - pad, 0), min(rows[-1] + 1 + pad, image.shape[0]))
    c = slice(max(cols[0] - pad, 0), min(cols[-1] + 1 + pad, image.shape[1]))
    out = image.astype(np.float32).copy()
    out[r, c] = inpaint_biharmonic(out[r, c], hole[r, c])
    return out


def histogram_match(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """scikit-image histogram matching of the input contrast's values to the example targets'."""
    from skimage.exposure import match_histograms

    return match_histograms(source, reference)


def linear_map(x_examples: np.ndarray, y_examples: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Least-squares line from input to target intensities, fitted on the example pairs."""
    a, b = np.polyfit(x_examples.astype(np.float64), y_examples.astype(np.float64), 1)
    return (a * x + b).astype(np.float32)
