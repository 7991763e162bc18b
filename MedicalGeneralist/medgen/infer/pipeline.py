"""One call from (volume, examples, task) to the output volume: the engine's public entry point.

Used by the command line, the Slicer Logic and the tests alike, so that every front end gets the
same checks, cancellation and geometry. A cancelled run returns None and has written nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from medgen.core.config import IMAGE_TASKS, modality_index, task_index
from medgen.core.device import free_bytes, resolve_device, set_threads
from medgen.core.errors import Cancelled, InputError
from medgen.prompts import Example, check_examples, example_labels
from medgen.core.grid import box_around, full_box, to_grid
from medgen.infer import selfcheck
from medgen.infer.imagetasks import example_grids, run_image_task
from medgen.infer.selfcheck import SelfCheckReport
from medgen.core.intensity import fit_normalizer
from medgen.nn.model import InContextUNet
from medgen.infer.predictor import Predictor
from medgen.infer.segment import (SegmentSettings, VolumeSegmenter, combine_labels, label_dtype,
                                  whole_image_side)
from medgen.core.volume import Volume, slice_view

Progress = Callable[[float, str], None]
LABEL_PASS_BYTES = 1 << 30
# Examples from other images (cross-subject) are read twice: by the network's context pathway and
# by this many fine-tuning steps on them (adapt.py). The context pathway alone recognises the
# domain and gives the same Dice whatever the number of examples; fine-tuning learns from each
# one (bench, BUSI held-out clusters, docs/BENCHMARKS.md: Dice against k). In-volume propagation
# does not adapt by default: there the labelled neighbours already carry the structure and the
# same fine-tuning lost Dice (model card, "AR + TTA").
CROSS_SUBJECT_ADAPT_STEPS = 40


@dataclass
class RunOptions:
    task: str
    axis: int = 0
    modality: str = "other"
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    adapt_steps: int | None = None  # None: CROSS_SUBJECT_ADAPT_STEPS from other images' examples, else 0
    adapt_seconds: float = 0.0
    segment: SegmentSettings = field(default_factory=SegmentSettings)
    method: str = "auto"  # "auto" (the self-check picks per label/task) or a method of selfcheck.methods


@dataclass
class RunResult:
    """The output volume and the self-check's report (method chosen, leave-one-out estimates)."""

    volume: Volume
    report: SelfCheckReport


def run(model: InContextUNet, image: Volume, examples: list[Example], options: RunOptions,
        mask: Volume | None = None, progress: Progress | None = None,
        cancel: Callable[[], bool] | None = None) -> Volume | None:
    """Do the task the examples show on every slice of `image`; None when cancelled.

    The volume of `run_with_report`, for callers that only want the volume."""
    result = run_with_report(model, image, examples, options, mask, progress, cancel)
    return None if result is None else result.volume


def run_with_report(model: InContextUNet, image: Volume, examples: list[Example], options: RunOptions,
                    mask: Volume | None = None, progress: Progress | None = None,
                    cancel: Callable[[], bool] | None = None) -> RunResult | None:
    """The output by `options.method` ("auto": the method the self-check on the examples scores
    best, selfcheck.py) and the report of that choice; None when cancelled."""
    progress = progress or (lambda f, m: None)
    task = options.task
    task_index(task)
    check_examples(examples, task)
    _check_shapes(image, examples, options.axis)
    selfcheck.check_method(task, options.method)
    if task == "inpaint":
        _check_mask(image, mask)
    device = resolve_device(options.device)
    # Seeds and thread counts are process-wide: set them for this run only and give them back,
    # so a host process (Slicer, a notebook, a batch) keeps its own.
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        set_threads(options.threads)
        try:
            if task == "segment":
                mode = segment_mode(options.segment.mode, image, examples)
                answer = lambda p, parts=None: _segment(model, device, image, examples, options, p, cancel, parts)
                array, report = selfcheck.run_segmentation(model, device, image, examples, options, mode,
                                                           answer, progress, cancel,
                                                           _segment_fold(model, device, options, cancel),
                                                           torch.get_num_threads())
            else:
                answer = lambda p: _image_task(model, device, image, examples, options, mask, p, cancel)
                array, report = selfcheck.run_image_task(model, device, image, examples, options, mask,
                                                         answer, progress, cancel)
            return RunResult(image.with_array(array), report)
        except Cancelled:
            return None
        finally:
            torch.set_num_threads(threads)


def segment_mode(requested: str, image: Volume, examples: list[Example]) -> str:
    """The segmentation mode to run: the one asked for, or a refusal; never silently another.

    "propagate" marches from the image's own labelled slices (examples from other images, if any,
    join the context); it needs at least one of them. "independent" does every slice alone.
    "auto" propagates when some example is a slice of the image itself, else runs independently.
    """
    own = any(e.slice_index is not None for e in examples)
    if requested == "auto":
        return "propagate" if own and not image.is_2d else "independent"
    if requested == "propagate" and image.is_2d:
        raise InputError("propagation needs a 3D volume but the image is 2D: use the independent "
                         "(or automatic) segmentation mode")
    if requested == "propagate" and not own:
        raise InputError("propagation starts from labelled slices of the image itself, and none of "
                         "the examples is one: label a slice of this image, or use the independent "
                         "(or automatic) segmentation mode for examples from other images only")
    if requested not in ("propagate", "independent"):
        raise InputError(f"unknown segmentation mode {requested!r}: use auto, propagate or independent")
    return requested


def _check_shapes(image: Volume, examples: list[Example], axis: int) -> None:
    if image.array.ndim != 3:
        raise InputError(f"the image has shape {image.shape}: a 3D volume or a 2D image is needed")
    for e in examples:
        if e.image.shape != e.target.shape:
            raise InputError(f"an example's image {e.image.shape} and target {e.target.shape} differ in size")
    if not 0 <= axis < 3:
        raise InputError(f"axis {axis} is out of range: use 0, 1 or 2")


def check_mask_grid(image: Volume, mask: Volume) -> None:
    """A mask of the image's shape must also sample its points: every front end (command line,
    Slicer, batch, Python) gets this check from the pipeline; the command line calls it early."""
    if mask.shape == image.shape and not image.same_grid(mask):
        raise InputError("the mask is not on the image's grid (spacing, origin or direction differ): "
                         "resample it onto the image first")


def _check_mask(image: Volume, mask: Volume | None) -> None:
    if mask is None:
        raise InputError("inpainting needs a mask: a volume or image marking the region to fill")
    if mask.shape != image.shape:
        raise InputError(f"the mask's shape {mask.shape} differs from the image's {image.shape}")
    check_mask_grid(image, mask)
    if not np.any(mask.array):
        raise InputError("the inpainting mask is empty: mark the region to fill with non-zero voxels")


def _segment_fold(model, device, options: RunOptions, cancel) -> Callable[[Example, list[Example]], np.ndarray]:
    """The model's label map of one hidden example pair from the others, as the run would segment a
    slice of the query (slice-by-slice self-check, slicewise.py): the pair's slice alone as a 2D
    image, in its own volume's intensity normalisation."""
    one = replace(options, axis=0, segment=replace(options.segment, mode="independent"))

    def fold(hidden: Example, others: list[Example]) -> np.ndarray:
        rows, cols = hidden.spacing
        image = Volume(hidden.image[None].astype(np.float32), (cols, rows, 1.0), is_2d=True)
        return _segment(model, device, image, others, one, lambda f, m: None, cancel, norm=hidden.image_norm)[0]
    return fold


def _segment(model, device, image, examples, options, progress, cancel,
             parts: dict[int, tuple[str, ...]] | None = None, norm=None) -> np.ndarray:
    """The model's segmentation; with `parts` (label value -> "between" / "beyond" its labelled
    slices) only those regions are propagated, the rest left empty (the self-check's other
    methods fill them). `norm`: the image's intensity normalisation (default: fitted on it)."""
    labels = example_labels(examples)
    slices = slice_view(image.array, options.axis)
    norm = norm if norm is not None else fit_normalizer(image.array, options.modality)
    spacing = image.slice_spacing(options.axis)
    mode = segment_mode(options.segment.mode, image, examples)
    # crops around the structure need its position in this volume: the image's own labelled slices
    in_volume = mode == "propagate" or all(e.slice_index is not None for e in examples) and not image.is_2d
    t, m = task_index("segment"), modality_index(options.modality)
    predictor = Predictor(_adapted(model, device, examples, options, in_volume, cancel, max(slices.shape[1:])),
                          device, cancel)
    best = np.zeros(slices.shape, np.float16)
    out = np.zeros(slices.shape, label_dtype(labels))
    # labels per pass: their float32 probabilities (+ fill prior and its stack) fit in a fixed
    # budget, so peak memory grows with the volume once, not once per label (nor with free RAM)
    per_label = slices[0].size * slices.shape[0] * 6
    budget = min(free_bytes(torch.device("cpu")) * 0.3, LABEL_PASS_BYTES)
    chunk = max(1, min(len(labels), int(budget // per_label)))
    for i in range(0, len(labels), chunk):
        part = labels[i:i + chunk]
        sub = lambda f, msg, i=i: progress((i + f * len(part)) / len(labels), msg)
        seg = VolumeSegmenter(predictor, slices, spacing=spacing, norm=norm, examples=examples, labels=part,
                              task=t, modality=m, in_volume=in_volume, settings=options.segment,
                              progress=sub, thickness=image.slice_thickness(options.axis), parts=parts)
        probs = seg.propagate() if mode == "propagate" else seg.independent()
        for s in range(probs.shape[1]):  # slice by slice: the overlap rule's temporaries stay small
            p = probs[:, s].astype(np.float16)
            top = p.max(0)
            better = (top > best[s]) & (top >= options.segment.threshold)
            if better.any():
                out[s][better] = combine_labels(p, part, options.segment.threshold)[better]
            best[s] = np.maximum(best[s], top)
        del probs
    for e in examples:
        if e.slice_index is not None:
            out[e.slice_index] = np.where(np.isin(e.target, labels), e.target, 0)
    progress(1.0, "done")
    return np.ascontiguousarray(np.moveaxis(out, 0, options.axis))


def _adapted(model, device, examples, options, in_volume, cancel=None, long_side: int = 0) -> InContextUNet:
    """Test-time adaptation on grid crops of the examples: as many steps as asked, or by default
    CROSS_SUBJECT_ADAPT_STEPS for a segmentation from other images' examples and none otherwise
    (image tasks' examples are crops of the same kind of image: not measured to pay off)."""
    steps = options.adapt_steps
    if steps is None:
        cross = options.task == "segment" and not in_volume and not options.adapt_seconds
        steps = CROSS_SUBJECT_ADAPT_STEPS if cross else 0
    if steps <= 0 and options.adapt_seconds <= 0:
        return model
    grid = model.config.grid
    if options.task == "segment":
        labels = example_labels(examples)
        # the scale the run will see: a structure's box in-volume, else the whole image at the
        # segmenter's side (finer than the grid for thin structures; adapt() then takes windows)
        side = grid if in_volume else whole_image_side(examples, labels, long_side, model.config)
        imgs, tgts = [], []
        for value in labels:
            boxes = [(box_around(e.target == value, e.spacing) if in_volume else None)
                     or full_box(e.image.shape, e.spacing) for e in examples]
            imgs.append([to_grid(e.image_norm(e.image), b, side) for e, b in zip(examples, boxes)])
            tgts.append([(to_grid((e.target == value).astype(np.float32), b, side) > 0.5)
                         for e, b in zip(examples, boxes)])
        images, targets = np.asarray(imgs, np.float32), np.asarray(tgts, np.float32)
    else:
        images, targets = (g[None] for g in example_grids(examples, grid))
    from medgen.infer.adapt import adapt  # imports MONAI's losses: only when adaptation is asked for

    model = model.to(device)
    return adapt(model, images, targets, task_index(options.task), modality_index(options.modality),
                 steps, options.adapt_seconds, seed=options.seed, cancel=cancel, window=grid)


def _image_task(model, device, image, examples, options, mask, progress, cancel) -> tuple[np.ndarray, float | None]:
    slices = slice_view(image.array, options.axis).astype(np.float32)
    in_norm = fit_normalizer(image.array, options.modality)
    out_norm = in_norm if options.task != "synthesize" else examples[0].target_norm
    holes = slice_view(mask.array != 0, options.axis) if options.task == "inpaint" else None
    predictor = Predictor(_adapted(model, device, examples, options, False, cancel), device, cancel)
    out, strength = run_image_task(predictor, slices, examples, task_index(options.task),
                                   modality_index(options.modality), in_norm, out_norm, holes, progress)
    progress(1.0, "done")
    return np.ascontiguousarray(np.moveaxis(out, 0, options.axis)), strength


__all__ = ["run", "run_with_report", "RunResult", "RunOptions", "SegmentSettings", "IMAGE_TASKS"]
