"""A run handed to another process as files: the query, the example slices, the options; and back.

The Slicer module (GUI process) and the worker (`medgen.worker`, a child process) share no
memory, so a run travels as a folder of plain files, as in SlicerMONAIAuto3DSeg and Slicer's CLI
modules; a failed run can be opened by hand. Volumes are NRRD written by the engine's own I/O
(uncompressed: the folder lives for seconds) with their exact geometry also in job.json; the
example slice pairs (2D) go into one .npz; the rest is job.json. Only what the model reads
travels: the query cut to the range being run, the example slices, the inpainting mask; never a
full-volume mask per segment. No torch here: the GUI process writes jobs and reads outputs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medgen.core.intensity import Normalizer
from medgen.core.volume import Volume
from medgen.io.images import read_volume, write_volume
from medgen.prompts import Example

FORMAT = 1
JOB_FILE = "job.json"
IMAGE_FILE = "image.nrrd"
MASK_FILE = "mask.nrrd"
EXAMPLES_FILE = "examples.npz"


@dataclass
class JobOptions:
    """The engine's RunOptions as plain JSON values (RunOptions itself needs torch)."""

    task: str
    axis: int = 0
    modality: str = "other"
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    adapt_steps: int | None = None  # None: the engine's default (pipeline.CROSS_SUBJECT_ADAPT_STEPS)
    mode: str = "auto"  # segmentation: auto, propagate (from the labelled slices) or independent


@dataclass
class Job:
    """One run: `groups` are run one after another (overlap-free segment groups; one for image tasks)."""

    image: Volume
    groups: list[list[Example]]
    options: JobOptions
    model: str | None = None  # registry id, local path or hf:// spec; None: the shipped default
    mask: Volume | None = None
    outputs: list[str] = field(default_factory=list)


def _geometry(volume: Volume) -> dict:
    return {"spacing": list(volume.spacing), "origin": list(volume.origin),
            "direction": list(volume.direction), "is_2d": volume.is_2d}


def _with_geometry(array: np.ndarray, geometry: dict) -> Volume:
    return Volume(np.asarray(array).reshape(array.shape if not geometry["is_2d"] else (1,) + array.shape[-2:]),
                  tuple(geometry["spacing"]), tuple(geometry["origin"]), tuple(geometry["direction"]),
                  geometry["is_2d"])


def _norm(n: Normalizer | None) -> dict | None:
    return None if n is None else asdict(n)


def _example_meta(e: Example) -> dict:
    return {"spacing": list(e.spacing), "image_norm": _norm(e.image_norm), "target_norm": _norm(e.target_norm),
            "slice_index": e.slice_index, "center": None if e.center is None else list(e.center)}


def write_job(job: Job, folder: str | Path) -> Path:
    """Write the job into an existing, empty folder; returns the job file."""
    folder = Path(folder)
    write_volume(job.image, folder / IMAGE_FILE, compress=False)
    if job.mask is not None:
        write_volume(job.mask, folder / MASK_FILE, job.mask.array.astype(np.uint8), compress=False)
    arrays = {}
    for g, examples in enumerate(job.groups):
        for n, e in enumerate(examples):
            arrays[f"image_{g}_{n}"], arrays[f"target_{g}_{n}"] = e.image, e.target
    np.savez(folder / EXAMPLES_FILE, **arrays)
    meta = {"format": FORMAT, "options": asdict(job.options), "model": job.model,
            "image": _geometry(job.image), "mask": None if job.mask is None else _geometry(job.mask),
            "groups": [[_example_meta(e) for e in examples] for examples in job.groups]}
    path = folder / JOB_FILE
    path.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return path


def read_job(folder: str | Path) -> Job:
    folder = Path(folder)
    meta = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"job format {meta.get('format')} is not {FORMAT}: the module and the engine "
                         "come from different versions; reinstall the extension")
    image = _with_geometry(read_volume(folder / IMAGE_FILE).array, meta["image"])
    mask = None
    if meta["mask"] is not None:
        mask = _with_geometry(read_volume(folder / MASK_FILE, label=True).array, meta["mask"])
    groups = []
    with np.load(folder / EXAMPLES_FILE) as arrays:
        for g, metas in enumerate(meta["groups"]):
            groups.append([_example(arrays[f"image_{g}_{n}"], arrays[f"target_{g}_{n}"], m)
                           for n, m in enumerate(metas)])
    return Job(image, groups, JobOptions(**meta["options"]), meta["model"], mask)


def _example(image: np.ndarray, target: np.ndarray, m: dict) -> Example:
    norm = lambda d: None if d is None else Normalizer(**d)
    return Example(image, target, tuple(m["spacing"]), norm(m["image_norm"]), norm(m["target_norm"]),
                   m["slice_index"], None if m["center"] is None else tuple(m["center"]))


def output_path(folder: str | Path, group: int) -> Path:
    return Path(folder) / f"output_{group}.nrrd"


def write_output(folder: str | Path, group: int, image: Volume, array: np.ndarray) -> Path:
    """One group's result on the job image's grid (labels, or the output image)."""
    return write_volume(image, output_path(folder, group), array, compress=False)


def read_output(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """A result array, checked against the shape the module expects."""
    array = read_volume(path).array
    array = array.reshape(shape) if array.size == int(np.prod(shape)) else array  # 2D images
    if array.shape != tuple(shape):
        raise ValueError(f"the worker's output {path} has shape {array.shape}, expected {tuple(shape)}")
    return array
