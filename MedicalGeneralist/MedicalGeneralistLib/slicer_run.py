"""One run of the engine from inside Slicer: read the scene, compute in the worker process, write.

Split so that the GUI stays responsive and a cancelled or failed run leaves nothing behind:
`prepare` reads MRML into numpy on the main thread (a snapshot: later edits in the scene do not
race with the run); `submit` writes what the model needs into a job folder and hands it to the
engine process (`medgen.worker`, see worker_client.py), whose progress the GUI polls without
blocking; `collect` reads the output files and `write` creates the result nodes on the main
thread, only after the engine finished. `process` chains them for scripts and tests (the module
Logic's `process`). No Qt, no `slicer.app` and no torch here: the pytest suite runs it on a
headless MRML scene, and Slicer's own process never loads torch.
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from MedicalGeneralistLib import slicer_io
from MedicalGeneralistLib.worker_client import WorkerError, WorkerJob, WorkerProcess
from medgen.core.config import IMAGE_TASKS, MODALITIES, TASKS
from medgen.core.errors import InputError
from medgen.core.intensity import guess_modality
from medgen.core.volume import Volume, anatomical_axis
from medgen.io import jobs
from medgen.prompts import inpaint_self_examples

Progress = Callable[[float, str], None]
RANGE_MODES = ("whole", "between", "around")
RESULT_SUFFIX = {"segment": "segmentation", "denoise": "denoised", "inpaint": "inpainted",
                 "synthesize": "synthesized"}


@dataclass
class RunRequest:
    """Everything the panel (or a script) asks for; node fields hold MRML nodes."""

    input_volume: slicer_io.MRMLNode
    task: str
    examples: Sequence[slicer_io.ExampleSlice] = ()
    segment_names: Sequence[str] | None = None  # None: every segment of the first example's target
    model: str | None = None  # registry id, local path or hf:// spec; None: the shipped default
    device: str = "auto"
    modality: str = "auto"
    range_mode: str = "whole"  # whole volume / between the labelled slices / N slices around them
    range_slices: int = 10
    mode: str = "propagate"
    adapt_steps: int | None = None  # None: the engine's default (pipeline.CROSS_SUBJECT_ADAPT_STEPS)
    output_segmentation: slicer_io.MRMLNode | None = None  # None: a NEW segmentation node
    mask_segmentation: slicer_io.MRMLNode | None = None  # inpainting: all its segments mark the holes
    threads: int | None = None
    seed: int = 0


@dataclass
class PreparedRun:
    """A numpy snapshot of the request: all that `compute` needs, no MRML access."""

    request: RunRequest
    image: Volume  # the query, cropped to the range along options.axis
    full_shape: tuple[int, ...]
    offset: int  # first slice of the crop along options.axis
    groups: list[slicer_io.ExampleGroup]
    options: jobs.JobOptions
    mask: Volume | None = None
    colors: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    input_array: np.ndarray | None = None  # image tasks: voxels kept outside the range


@dataclass
class RunResult:
    segments: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (name, full-size mask)
    volume: np.ndarray | None = None  # image tasks: full-size output voxels


# -- main thread: read -------------------------------------------------------------------------
def prepare(request: RunRequest) -> PreparedRun:
    """Check the request and read the scene; every mistake is reported here, before the model runs."""
    _check_request(request)
    node = request.input_volume
    full = slicer_io.node_to_volume(node, "input volume")
    entries = list(request.examples)
    if request.task == "inpaint" and not entries:
        axis, own = anatomical_axis("axial", full), []  # self-made examples: axial slices
    else:
        axis, own = slicer_io.run_axis(entries, node, full)
    if full.is_2d:
        axis = 0
    lo, hi = _span(request, own, full.shape[axis])
    image = full if (lo, hi) == (0, full.shape[axis] - 1) else Volume(
        slicer_io.crop_along(full.array, axis, lo, hi - lo + 1), full.spacing, full.origin, full.direction, full.is_2d)
    modality = guess_modality(full.array) if request.modality == "auto" else request.modality
    options = jobs.JobOptions(request.task, axis, modality, request.device, request.threads, request.seed,
                              request.adapt_steps, request.mode)
    mask = _mask(request, full, axis, lo, image.shape[axis])
    if entries:
        gathered = slicer_io.gather_examples(entries, node, image, axis, request.task, modality,
                                      request.segment_names, offset=lo)
        groups, colors = gathered.groups, gathered.colors
    else:
        groups, colors = [slicer_io.ExampleGroup(inpaint_self_examples(image, mask, axis, modality))], {}
    return PreparedRun(request, image, full.shape, lo, groups, options, mask, colors,
                       full.array if request.task in IMAGE_TASKS else None)


def _check_request(r: RunRequest) -> None:
    if r.task not in TASKS:
        raise InputError(f"unknown task {r.task!r}: choose one of {', '.join(TASKS)}")
    if r.modality != "auto" and r.modality not in MODALITIES:
        raise InputError(f"unknown modality {r.modality!r}: choose auto or one of {', '.join(MODALITIES)}")
    if r.range_mode not in RANGE_MODES:
        raise InputError(f"unknown range {r.range_mode!r}: choose one of {', '.join(RANGE_MODES)}")
    if r.range_slices < 0 or (r.adapt_steps or 0) < 0:
        raise InputError("the slice count and adaptation steps cannot be negative")
    slicer_io.check_scalar_volume(r.input_volume, "input volume")
    if r.task == "inpaint" and r.mask_segmentation is None:
        raise InputError("inpainting needs a mask: choose a segmentation whose segments cover the region to fill")
    if r.task != "inpaint" and not r.examples:
        raise InputError("no example slices yet: show a labelled slice in a view and click 'Add current slice'")
    out = r.output_segmentation
    if out is not None and not out.IsA("vtkMRMLSegmentationNode"):
        raise InputError(f"output '{out.GetName()}' is not a segmentation node")


def _span(request: RunRequest, own: list[int], size: int) -> tuple[int, int]:
    """First and last slice to compute; ranges around examples need examples of the input itself."""
    if request.range_mode == "whole" or not own:
        return 0, size - 1
    pad = request.range_slices if request.range_mode == "around" else 0
    return max(0, min(own) - pad), min(size - 1, max(own) + pad)


def _mask(request: RunRequest, full: Volume, axis: int, lo: int, size: int) -> Volume | None:
    if request.task != "inpaint":
        return None
    holes = slicer_io.union_mask(request.mask_segmentation, request.input_volume).astype(np.uint8)
    if not holes.any():
        raise InputError(f"the mask segmentation '{request.mask_segmentation.GetName()}' is empty: "
                         "paint the region to fill")
    return Volume(slicer_io.crop_along(holes, axis, lo, size), full.spacing, full.origin, full.direction, full.is_2d)


# -- the worker process: compute -------------------------------------------------------------
def submit(prepared: PreparedRun, worker: WorkerProcess) -> WorkerJob:
    """Write the job folder and hand it to the worker (started if needed); returns at once."""
    folder = tempfile.mkdtemp(prefix="medgen-job-")
    job = jobs.Job(prepared.image, [g.examples for g in prepared.groups], prepared.options,
                   prepared.request.model, prepared.mask)
    try:
        jobs.write_job(job, folder)
        return worker.submit(folder)
    except BaseException:  # disk full, no PythonSlicer...: leave no folder behind
        shutil.rmtree(folder, ignore_errors=True)
        raise


def collect(prepared: PreparedRun, job: WorkerJob) -> RunResult:
    """The finished job's output files, back at the input's full size (labels -> named masks)."""
    if job.state != "done":
        raise WorkerError(str(job.error) if job.error else f"the run is {job.state}, not done")
    if len(job.outputs) != len(prepared.groups):
        raise WorkerError(f"the engine returned {len(job.outputs)} results for {len(prepared.groups)} groups")
    result = RunResult()
    for group, path in zip(prepared.groups, job.outputs):
        full = _uncrop(prepared, jobs.read_output(path, prepared.image.shape), prepared.options.axis)
        if prepared.options.task == "segment":
            result.segments += [(name, full == value) for value, name in enumerate(group.names, 1)]
        else:
            result.volume = full
    return result


def _uncrop(prepared: PreparedRun, array: np.ndarray, axis: int) -> np.ndarray:
    """Back to the input's full size: empty labels (or the input's own voxels) outside the range."""
    if array.shape == prepared.full_shape:
        return array
    if prepared.input_array is not None:
        full = prepared.input_array.astype(array.dtype, copy=True)
    else:
        full = np.zeros(prepared.full_shape, array.dtype)
    np.moveaxis(full, axis, 0)[prepared.offset:prepared.offset + array.shape[axis]] = np.moveaxis(array, axis, 0)
    return full


# -- main thread: write ------------------------------------------------------------------------
def write(prepared: PreparedRun, result: RunResult):
    """Create the result: a NEW node, or NEW segments in the chosen segmentation. Returns the node."""
    request = prepared.request
    node = request.input_volume
    if node.GetScene() is None or not node.GetScene().IsNodePresent(node):
        raise InputError("the input volume was removed from the scene during the run: nothing was written")
    name = f"{node.GetName()} {RESULT_SUFFIX[request.task]}"
    if request.task in IMAGE_TASKS:
        return slicer_io.new_volume_node(node, result.volume, name)
    target = request.output_segmentation
    if target is None or target.GetScene() is None or not target.GetScene().IsNodePresent(target):
        target = slicer_io.new_segmentation_node(node, name)
    slicer_io.add_segments(target, node, [(n, prepared.colors.get(n), mask) for n, mask in result.segments])
    return target


def finish(prepared: PreparedRun, job: WorkerJob):
    """After a job ended: the written node, None when cancelled; raises on failure. Removes the folder."""
    try:
        if job.state == "cancelled":
            return None
        if job.state == "failed":
            error = job.error or WorkerError("the run failed")
            raise InputError(str(error)) if error.kind == "input" else error
        return write(prepared, collect(prepared, job))
    finally:
        job.discard()


def report_lines(prepared: PreparedRun, job) -> list[str]:
    """The self-check's lines of a finished job, with segment names instead of label values
    ("liver: registration, estimated Dice 0.93 (model 0.90, fill 0.87) from 4 labelled slices")."""
    out = []
    for group, lines in zip(prepared.groups, job.report):
        for line in lines:
            match = re.match(r"label (\d+): (.*)", line)
            if match and 0 < int(match[1]) <= len(group.names):
                line = f"{group.names[int(match[1]) - 1]}: {match[2]}"
            out.append(line)
    return out


def engine_job_runner(worker: WorkerProcess):
    """A Runner for the Segment Editor effect (effect_logic's seam) that computes in the worker
    process instead of Slicer's: `progress` is called between polls (the effect may process Qt
    events there), `cancel` kills the process. Returns the segment's voxels, or None if cancelled."""
    from medgen.prompts import pairs_from_volumes

    def run(job, progress, cancel):
        examples = pairs_from_volumes(job.image, job.image.with_array(job.target), job.axis, list(job.slices),
                                      "segment", job.modality, True)
        folder = tempfile.mkdtemp(prefix="medgen-job-")
        jobs.write_job(jobs.Job(job.image, [examples], jobs.JobOptions("segment", job.axis, job.modality, job.device),
                                job.model), folder)
        running = worker.submit(folder)
        try:
            running.wait(cancel=cancel, progress=progress)
            if running.state == "cancelled":
                return None
            if running.state == "failed":
                raise InputError(str(running.error)) if running.error.kind == "input" else running.error
            return jobs.read_output(running.outputs[0], job.image.shape) != 0
        finally:
            running.discard()

    return run


_SHARED: list[WorkerProcess] = []


def shared_worker() -> WorkerProcess:
    """One warm worker for scripts that do not bring their own (stopped when Python exits)."""
    if not _SHARED:
        _SHARED.append(WorkerProcess())
        atexit.register(_SHARED[0].stop)
    return _SHARED[0]


def process(request: RunRequest, worker: WorkerProcess | None = None, progress: Progress | None = None,
            cancel: Callable[[], bool] | None = None, timeout: float | None = None):
    """Blocking run for scripts and tests: the written node, or None if cancelled (nothing written)."""
    prepared = prepare(request)
    job = submit(prepared, worker or shared_worker())
    if not job.wait(timeout, cancel=cancel, progress=progress):
        job.cancel()
        job.discard()
        raise WorkerError(f"the run did not finish within {timeout} s: it was stopped", "timeout")
    return finish(prepared, job)


__all__ = ["RunRequest", "PreparedRun", "RunResult", "prepare", "submit", "collect", "write", "finish",
           "process", "shared_worker", "engine_job_runner", "RANGE_MODES"]
