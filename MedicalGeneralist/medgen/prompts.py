"""Example pairs (the prompt): building them from volumes, slices and 2D images, with checks.

An `Example` is one context pair in native slice pixels plus what is needed to bring it to the
model: its normalisers and, when it is a slice of the query volume itself, its index (which makes
propagation possible and lets labelled slices be copied exactly into the output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medgen.core.errors import InputError
from medgen.core.intensity import Normalizer, fit_normalizer
from medgen.core.volume import Volume, parse_axis, take_slice


@dataclass
class Example:
    image: np.ndarray  # 2D, input units
    target: np.ndarray  # 2D: label values (segment) or intensities (image tasks)
    spacing: tuple[float, float]
    image_norm: Normalizer
    target_norm: Normalizer | None = None
    slice_index: int | None = None  # set when the pair is a slice of the query volume
    center: tuple[int, int] | None = None  # where image tasks should look (e.g. the hole)


def example_labels(examples: list[Example]) -> list[int]:
    """The label values the examples show (each becomes one output label)."""
    return sorted({int(v) for e in examples for v in np.unique(e.target) if v != 0})


def labelled_slices(target: Volume, axis: int) -> list[int]:
    """Every slice of a label volume that holds any label (the default labelled slices)."""
    other = tuple(a for a in range(3) if a != axis)
    return [int(i) for i in np.nonzero(np.any(target.array != 0, axis=other))[0]]


def parse_slices(text: str | None) -> list[int] | None:
    """'12,40,71' -> [12, 40, 71], with a message for anything else."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return sorted({int(t) for t in str(text).replace(" ", "").split(",") if t})
    except ValueError as err:
        raise InputError(f"example slices {text!r}: give comma-separated slice indices like 12,40,71") from err


def check_pair(image: Volume, target: Volume, what: str, same_grid: bool = False) -> None:
    if image.shape != target.shape:
        raise InputError(f"{what}: image shape {image.shape} and target shape {target.shape} differ: "
                         "each context image needs a target of the same size")
    if same_grid and not image.same_grid(target):
        raise InputError(f"{what}: image and target are on different grids (spacing, origin or "
                         "direction differ): resample the target onto the image first "
                         "(e.g. SimpleITK Resample or Slicer's Resample Scalar/Vector/DWI Volume)")


def pairs_from_volumes(image: Volume, target: Volume, axis: int, indices: list[int] | None,
                       task: str, modality: str, own: bool) -> list[Example]:
    """Examples from one (image, target) pair of volumes; 2D pairs give one example.

    `own` marks slices of the query volume itself, so propagation knows where they sit.
    """
    if image.is_2d:
        indices, axis = [0], 0
    elif indices is None:
        indices = labelled_slices(target, axis) if task == "segment" else _spread(image.shape[axis])
    if not indices:
        raise InputError("no labelled slice found in the context target: label at least one slice "
                         "or name the example slices")
    img_norm = fit_normalizer(image.array, modality)
    tgt_norm = None if task == "segment" else (
        img_norm if task in ("denoise", "inpaint") else fit_normalizer(target.array, modality))
    spacing = image.slice_spacing(axis)
    return [Example(take_slice(image.array, axis, i).astype(np.float32), take_slice(target.array, axis, i),
                    spacing, img_norm, tgt_norm, i if own else None) for i in indices]


def examples_from_files(task: str, image: Volume, context_images: list[str], context_targets: list[str],
                        slices: list[int] | None, axis_spec: str | int | None,
                        modality: str) -> list[Example]:
    """Example pairs read from files: other images' (image, target) pairs, or the image's own
    target (labels or second contrast) when no context image is given. Empty only for
    inpainting without examples (they are then made from the image and its mask).

    `axis_spec` (0/1/2 or an anatomical name) is resolved per volume: "axial" may be a different
    array axis in another patient's file.
    """
    from medgen.io.images import read_volume  # SimpleITK: only when files are read

    label = task == "segment"
    if context_images:
        if len(context_images) != len(context_targets):
            raise InputError(f"{len(context_images)} example images but {len(context_targets)} example "
                             "targets: give one target per example image, in the same order")
        examples = []
        for ip, tp in zip(context_images, context_targets):
            ci, ct = read_volume(ip), read_volume(tp, label=label)
            check_pair(ci, ct, f"example pair {ip} / {tp}", same_grid=True)
            axis = 0 if ci.is_2d else parse_axis(axis_spec, ci)
            examples += pairs_from_volumes(ci, ct, axis, slices, task, modality, own=False)
        return examples
    if context_targets:
        if len(context_targets) > 1:
            raise InputError("without example images, give one example target: the labels (or second "
                             "contrast) of the image itself")
        target = read_volume(context_targets[0], label=label)
        if target.shape != image.shape:
            raise InputError(f"the example target's shape {target.shape} differs from the image's "
                             f"{image.shape}: targets of the image itself must share its grid")
        if not image.same_grid(target):
            what = "second contrast" if task == "synthesize" else "target"
            raise InputError(f"the {what} is not on the image's grid (spacing, origin or direction "
                             "differ): resample it onto the image first (register it for synthesis)")
        return pairs_from_volumes(image, target, parse_axis(axis_spec, image), slices, task, modality, own=True)
    if task == "inpaint":
        return []
    raise InputError("no examples: give the labels (or second contrast) of this image, or example "
                     "pairs from other images")


def _spread(n: int, count: int = 8) -> list[int]:
    """Evenly spread slices from the middle 80% of a volume (image tasks need no labels)."""
    lo, hi = int(n * 0.1), max(int(n * 0.9) - 1, int(n * 0.1))
    return sorted({int(round(v)) for v in np.linspace(lo, hi, min(count, n))})


def check_examples(examples: list[Example], task: str) -> None:
    """Refuse prompts the model cannot learn from."""
    if not examples:
        raise InputError("no examples were given: give labelled slices of the image, or example pairs "
                         "from other images, so the model can see what to do")
    if task == "segment" and not any(np.any(e.target != 0) for e in examples):
        raise InputError("the example targets hold no label at all: paint the structure on at "
                         "least one example slice")
    for e in examples:
        if e.target.dtype.kind == "f" and not np.isfinite(e.target).all():
            raise InputError("an example target holds NaN or Inf values: replace them first")
        if task == "segment" and e.target.dtype.kind == "f" and np.any(e.target != np.round(e.target)):
            raise InputError("an example segmentation holds fractional values (a probability map?): "
                             "give a label image with whole-number labels, e.g. threshold it at 0.5")
        if task == "segment" and e.target.min() < 0:
            raise InputError("an example segmentation holds negative labels: use labels 1, 2, ...")


# share of the hole's voxels that must hold tissue in an example slice, relative to the best slice:
# intact slices are spread over the whole volume, and at its ends the hole falls on air, where a
# fill is trivially right for every method and teaches the model nothing (the bench's AURORA hole
# on the two outermost of six example slices: 143 and 168 of ~1000 voxels tissue, biharmonic 7.7 /
# 18.5 dB against the model's 5.1 / 9.0, while the model won the four tissue slices by 0.1-0.3 dB;
# those two folds alone made the self-check pick biharmonic, 0.05 dB under the model on the bench)
TISSUE_SHARE = 0.5
TISSUE_LEVEL = 0.05  # normalised intensity above which a voxel counts as tissue, not background


def inpaint_self_examples(image: Volume, mask: Volume, axis: int, modality: str,
                          count: int = 6) -> list[Example]:
    """Examples for inpainting without a prompt: the same hole applied to intact slices that hold
    tissue where the hole is (see TISSUE_SHARE), spread over those slices.

    For a 2D image the hole is moved to intact places of the same image instead.
    """
    norm = fit_normalizer(image.array, modality)
    spacing = image.slice_spacing(axis)
    holes = np.moveaxis(mask.array != 0, axis, 0)
    imgs = np.moveaxis(image.array, axis, 0).astype(np.float32)
    with_hole = [i for i in range(holes.shape[0]) if holes[i].any()]
    if not with_hole:
        raise InputError("the inpainting mask is empty: mark the region to fill with non-zero voxels")
    hole = holes[with_hole[len(with_hole) // 2]]
    if image.is_2d:
        return _shifted_holes(imgs[0], hole, spacing, norm, count)
    intact = [i for i in range(imgs.shape[0]) if not holes[i].any() and imgs[i].std() > 0]
    if not intact:
        return _shifted_holes(imgs[with_hole[0]], hole, spacing, norm, count)
    share = np.array([_tissue_share(imgs[i], hole, norm) for i in intact])
    intact = [i for i, v in zip(intact, share) if v >= TISSUE_SHARE * share.max()]
    picks = [intact[int(j)] for j in np.linspace(0, len(intact) - 1, min(count, len(intact)))]
    centre = tuple(int(v) for v in np.mean(np.nonzero(hole), axis=1))
    return [Example(imgs[i] * ~hole, imgs[i], spacing, norm, norm, None, centre) for i in picks]


def _tissue_share(img: np.ndarray, hole: np.ndarray, norm: Normalizer) -> float:
    """The share of the hole's voxels that hold tissue in `img`."""
    return float(np.mean(norm(img[hole]) > TISSUE_LEVEL))


def _shifted_holes(img: np.ndarray, hole: np.ndarray, spacing, norm: Normalizer,
                   count: int) -> list[Example]:
    """The hole moved to `count` places of the image that it does not overlap, the most tissue
    under it first (of up to ten times as many random tries)."""
    rows, cols = np.nonzero(hole)
    h, w = img.shape
    tries = []
    rng = np.random.default_rng(0)
    for _ in range(count * 10):
        dr = int(rng.integers(-rows.min(), h - rows.max()))
        dc = int(rng.integers(-cols.min(), w - cols.max()))
        moved = np.zeros_like(hole)
        moved[rows + dr, cols + dc] = True
        if not (moved & hole).any():
            tries.append((_tissue_share(img, moved, norm), (int(rows.mean()) + dr, int(cols.mean()) + dc), moved))
    if not tries:
        raise InputError("the inpainting hole covers too much of the image to make examples from "
                         "it: give example pairs (an image with a hole and the intact image)")
    best = sorted(tries, key=lambda t: -t[0])[:count]
    return [Example(img * ~moved, img, spacing, norm, norm, None, centre) for _, centre, moved in best]
