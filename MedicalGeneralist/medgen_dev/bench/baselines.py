"""The tools users already have, as `medgen bench` runs them beside the model.

Every baseline is library code (ITK, SimpleITK, scikit-image, MONAI); this module only feeds them.
Where a baseline has a parameter (NL-means h, TV weight) it is chosen on the same example pairs
the model is given, never on the scored slices, so both sides see the same information.
Propagation baselines take slices-first arrays (slice axis 0) and {slice index: 2D mask}.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

# the runtime's classical methods (the self-check's candidates): one copy, scored here as baselines
from medgen.infer.classical import (NLM_FACTORS, TV_WEIGHTS, biharmonic, histogram_match,  # noqa: F401
                                    linear_map, nearest_copy, nl_means, noise_sigma, pick_parameter,
                                    registration_propagate, sitk2d as _sitk2d, tv)

PROPAGATION_BASELINES = ("nearest slice copy", "fill between slices (ITK MCI)", "registration (SimpleITK demons)")
CROSS_BASELINES = ("mean of example masks", "multi-atlas (affine + majority vote)")


# -- in-volume propagation ------------------------------------------------------------------------
def copy_nearest(labels: np.ndarray, given: list[int]) -> np.ndarray:
    """Every slice takes the labels of the nearest labelled slice (the demo's baseline)."""
    return nearest_copy(labels, given) > 0


def fill_between_slices(labels: np.ndarray, given: list[int]) -> np.ndarray:
    """ITK's MorphologicalContourInterpolator (Slicer's "Fill between slices"), default settings,
    along the slice axis (interpolate.py; the model's own prior between labelled slices)."""
    from medgen.infer import interpolate

    return interpolate.fill_between_slices(labels > 0, given,
                                           backend_name=interpolate.backend(interpolate.SLICER))


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
