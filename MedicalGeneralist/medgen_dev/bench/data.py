"""What `medgen bench` measures: its configuration file, the folder layout for users' own data,
and the small data operations every section shares (crops, example-slice choice, simulated noise).

Two ways in, one `BenchConfig` out:
- a JSON configuration (the shipped `Resources/Bench/shared_data.json` describes ../shared/data),
  which names every file and says per entry whether the model saw it in training, so the report
  can put "seen in training" beside every number;
- a folder in the layout documented in docs/BENCHMARKS.md (`--data DIR`), so that a user can
  benchmark the model and the baselines on their own cases without writing a configuration.
Files are read at run time and never copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medgen.core.errors import InputError
from medgen.io.images import read_volume
from medgen.core.intensity import Normalizer
from medgen.core.volume import Volume, parse_axis

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = REPO_ROOT / "Resources" / "Bench" / "shared_data.json"
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class Structure:
    """One binary 3D structure (label values OR-ed together) for in-volume propagation."""

    name: str
    image: Path
    label: Path
    values: tuple[int, ...]
    modality: str
    axis: str = "axial"
    seen: str = "unknown"  # "yes" / "no" / "unknown": did training see this volume and label?
    labels_by: str = "unknown"
    quick: bool = False


@dataclass
class PairSet:
    """2D image + mask pairs for cross-subject segmentation: queries and a pool of examples."""

    name: str
    queries: list[tuple[Path, Path]]
    pool: list[tuple[Path, Path]]
    modality: str
    seen_queries: str = "unknown"
    seen_pool: str = "unknown"
    labels_by: str = "unknown"
    quick: bool = False
    leave_one_out: bool = False  # queries are pool members: never use a query as its own example


@dataclass
class ImageCase:
    """A denoise / inpaint / synthesis case: an input volume and what the output should be."""

    name: str
    task: str
    image: Path  # the clean volume (denoise), the intact volume (inpaint) or the input contrast
    modality: str
    target: Path | None = None  # synthesis: the target contrast on the image's grid
    mask: Path | None = None  # inpaint: region to fill (reoriented onto the image's voxel order)
    noise: float = 0.05  # denoise: noise level as a fraction of the normalised intensity range
    foreground_above: float | None = None  # voxels scored: reference above this (None: all)
    axis: str = "axial"
    seen: str = "unknown"
    quick: bool = False


@dataclass
class SpeedSpec:
    sizes: list[tuple[int, int, int]] = field(default_factory=lambda: [(64, 128, 128)])
    k: list[int] = field(default_factory=lambda: [1, 8, 32])
    tasks: list[str] = field(default_factory=lambda: ["segment", "denoise"])
    denoise_k: list[int] = field(default_factory=lambda: [8])  # denoising cost hardly depends on k
    flops_size: int = 128
    slab: int = 0  # >0: slice-wise runs (reference, denoising) time this many central slices
    slab_from: int = 0  # ...on volumes with at least this many voxels (0: every volume)
    # `medgen run` as users meet it: fresh process (cold), optionally a warm second run, per method
    user_runs: list[dict] = field(default_factory=list)  # {shape, task, labels, method, warm}


@dataclass
class BenchConfig:
    name: str
    source: str
    structures: list[Structure] = field(default_factory=list)
    pair_sets: list[PairSet] = field(default_factory=list)
    image_cases: list[ImageCase] = field(default_factory=list)
    propagation_k: list[int] = field(default_factory=lambda: [1, 3, 5])
    cross_k: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    queries_per_set: int = 40
    image_examples: int = 4
    eval_slices: int = 16
    crop: bool = False  # quick runs crop every 3D case around its structure / hole
    seed: int = 0
    data_root: Path | None = None  # the shared data folder (the in-context section's cases live there)
    speed: SpeedSpec = field(default_factory=SpeedSpec)


# -- the JSON configuration ------------------------------------------------------------------------
def load_config(path: str | Path | None = None, quick: bool = False) -> BenchConfig:
    """Read a configuration; `quick` keeps the entries marked quick and the quick settings."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise InputError(f"{path}: benchmark configuration not found")
    raw = json.loads(path.read_text())
    root = (path.parent / raw.get("data_root", ".")).resolve()
    if not root.is_dir():
        raise InputError(f"{path}: data_root {root} does not exist (the shipped configuration "
                         "expects ../shared/data beside the repository)")
    cfg = BenchConfig(raw.get("name", path.stem), str(path), seed=int(raw.get("seed", 0)), data_root=root)
    prop, cross, img = raw.get("propagation", {}), raw.get("cross_subject", {}), raw.get("image_tasks", {})
    cfg.structures = [_structure(root, s) for s in prop.get("structures", [])]
    cfg.pair_sets = [_pair_set(root, s) for s in cross.get("sets", [])]
    cfg.image_cases = [_image_case(root, c) for c in img.get("cases", [])]
    cfg.propagation_k = list(prop.get("k", cfg.propagation_k))
    cfg.cross_k = list(cross.get("k", cfg.cross_k))
    cfg.queries_per_set = int(cross.get("queries_per_set", cfg.queries_per_set))
    cfg.image_examples = int(img.get("examples", cfg.image_examples))
    cfg.eval_slices = int(img.get("eval_slices", cfg.eval_slices))
    cfg.speed = _speed(raw.get("speed", {}))
    return apply_quick(cfg, raw.get("quick", {})) if quick else cfg


def _structure(root: Path, s: dict) -> Structure:
    return Structure(s["name"], root / s["image"], root / s["label"], tuple(s.get("values", [1])),
                     s.get("modality", "other"), str(s.get("axis", "axial")),
                     _seen(s.get("seen_in_training")), s.get("labels_by", "unknown"), bool(s.get("quick")))


def _pair_set(root: Path, s: dict) -> PairSet:
    def pairs(ids: list[str]) -> list[tuple[Path, Path]]:
        return [(root / s["image_pattern"].format(i), root / s["mask_pattern"].format(i)) for i in ids]
    return PairSet(s["name"], pairs(s["queries"]), pairs(s.get("examples", s["queries"])),
                   s.get("modality", "other"), _seen(s.get("seen_queries")), _seen(s.get("seen_examples")),
                   s.get("labels_by", "unknown"), bool(s.get("quick")),
                   bool(s.get("leave_one_out", "examples" not in s)))


def _image_case(root: Path, c: dict) -> ImageCase:
    opt = lambda key: root / c[key] if c.get(key) else None
    return ImageCase(c["name"], c["task"], root / c["image"], c.get("modality", "other"), opt("target"),
                     opt("mask"), float(c.get("noise", 0.05)), c.get("foreground_above"),
                     str(c.get("axis", "axial")), _seen(c.get("seen_in_training")), bool(c.get("quick")))


def _speed(s: dict) -> SpeedSpec:
    spec = SpeedSpec()
    spec.sizes = [tuple(int(v) for v in shape) for shape in s.get("sizes", spec.sizes)]
    spec.k = list(s.get("k", spec.k))
    spec.tasks = list(s.get("tasks", spec.tasks))
    spec.flops_size = int(s.get("flops_size", spec.flops_size))
    spec.denoise_k = list(s.get("denoise_k", spec.denoise_k))
    spec.slab = int(s.get("slab", spec.slab))
    spec.slab_from = int(s.get("slab_from", spec.slab_from))
    spec.user_runs = [_user_run(r) for r in s.get("user_runs", [])]
    return spec


def _user_run(r: dict) -> dict:
    return {"shape": tuple(int(v) for v in r["shape"]), "task": r.get("task", "segment"),
            "labels": int(r.get("labels", 1)), "method": r.get("method", "auto"), "warm": bool(r.get("warm"))}


def _seen(value) -> str:
    """Normalise the seen-in-training flag: a benchmark row must say yes, no or unknown."""
    if value is True or str(value).lower() in ("yes", "true"):
        return "yes"
    if value is False or str(value).lower() in ("no", "false"):
        return "no"
    return "unknown"


def apply_quick(cfg: BenchConfig, q: dict) -> BenchConfig:
    """The CI subset: entries marked quick (or the first of each kind), few k, few slices, crops."""
    pick = lambda items: [i for i in items if i.quick] or items[:1]
    speed = replace(cfg.speed, sizes=[tuple(v) for v in q.get("speed_sizes", [[16, 128, 128]])],
                    k=list(q.get("speed_k", [1, 8])), tasks=list(q.get("speed_tasks", ["segment"])),
                    user_runs=[_user_run(r) for r in q.get("speed_user_runs", [])])
    return replace(cfg, structures=pick(cfg.structures), pair_sets=pick(cfg.pair_sets),
                   image_cases=pick(cfg.image_cases),
                   propagation_k=list(q.get("propagation_k", [1, 3])),
                   cross_k=list(q.get("cross_k", [1, 4])),
                   queries_per_set=int(q.get("queries_per_set", 3)),
                   eval_slices=int(q.get("eval_slices", 2)), crop=True, speed=speed)


# -- users' own data: the folder layout ------------------------------------------------------------
def config_from_folder(folder: str | Path, quick: bool = False) -> BenchConfig:
    """A configuration for a folder in the documented layout (see docs/BENCHMARKS.md)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    meta = _meta(folder)
    mod, axis, seen = meta.get("modality", "other"), str(meta.get("axis", "axial")), _seen(meta.get("seen_in_training"))
    cfg = BenchConfig(folder.name, str(folder))
    for case in _subdirs(folder / "3d"):
        image, label = _one(case, "image"), _one(case, "label")
        for v in _label_values(label):
            cfg.structures.append(Structure(f"{case.name} label {v}", image, label, (v,), mod, axis, seen))
        cfg.image_cases.append(ImageCase(f"{case.name} denoise", "denoise", image, mod,
                                         noise=float(meta.get("noise", 0.05)), axis=axis, seen=seen))
        mask = _one(case, "mask", required=False)
        if mask is not None:
            cfg.image_cases.append(ImageCase(f"{case.name} inpaint", "inpaint", image, mod, mask=mask,
                                             axis=axis, seen=seen))
    for s in _subdirs(folder / "2d"):
        pairs = [(p, _mask_for(s, p)) for p in sorted((s / "images").iterdir()) if _is_image(p)]
        if len(pairs) >= 2:
            cfg.pair_sets.append(PairSet(s.name, pairs, pairs, mod, seen, seen, leave_one_out=True))
    for case in _subdirs(folder / "paired"):
        task = _meta(case).get("task", "synthesize")
        cfg.image_cases.append(ImageCase(f"{case.name} {task}", task, _one(case, "input"), mod,
                                         target=_one(case, "target"), axis=axis, seen=seen))
    if not (cfg.structures or cfg.pair_sets or cfg.image_cases):
        raise InputError(f"{folder}: nothing to benchmark: expected 3d/<case>/image+label, "
                         "2d/<set>/images+masks or paired/<case>/input+target (docs/BENCHMARKS.md)")
    return apply_quick(cfg, {}) if quick else cfg


def _meta(folder: Path) -> dict:
    path = folder / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _is_image(p: Path) -> bool:
    return p.name.lower().endswith(IMAGE_SUFFIXES + VOLUME_SUFFIXES)


def _one(folder: Path, stem: str, required: bool = True) -> Path | None:
    hits = [p for p in folder.iterdir() if _is_image(p) and p.name.split(".")[0] == stem]
    if not hits and required:
        raise InputError(f"{folder}: no {stem}.* file (expected e.g. {stem}.nii.gz)")
    return hits[0] if hits else None


def _mask_for(s: Path, image: Path) -> Path:
    stem = image.name.split(".")[0]
    hits = [p for p in (s / "masks").iterdir() if p.name.split(".")[0] == stem] if (s / "masks").is_dir() else []
    if not hits:
        raise InputError(f"{image}: no mask with the same name in {s / 'masks'}")
    return hits[0]


def _label_values(label: Path) -> list[int]:
    return [int(v) for v in np.unique(read_volume(label, label=True).array) if v != 0]


# -- shared data operations -------------------------------------------------------------------------
def load_structure(s: Structure) -> tuple[Volume, Volume, int]:
    """(image, binary label, numpy slice axis) with the structure's values OR-ed into 1."""
    image = read_volume(s.image)
    label = read_volume(s.label, label=True)
    if label.shape != image.shape:
        raise InputError(f"{s.label}: shape {label.shape} differs from the image's {image.shape}")
    binary = label.with_array(np.isin(label.array, s.values).astype(np.uint8))
    if not binary.array.any():
        raise InputError(f"{s.label}: none of the values {s.values} is present")
    return image, binary, parse_axis(s.axis, image)


def crop_around(image: Volume, label: Volume, axis: int, slab: int = 3,
                margin: float = 0.5, min_side: int = 48) -> tuple[Volume, Volume]:
    """Quick runs: a slab of the structure's extent +- `slab` slices and an in-plane box with a
    margin, so CI spends seconds, not minutes, while still testing the same code path."""
    box = []
    for a in range(3):
        other = tuple(b for b in range(3) if b != a)
        idx = np.nonzero(label.array.any(other))[0]
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        pad = slab if a == axis else max(int((hi - lo) * margin), (min_side - (hi - lo)) // 2, 4)
        box.append(slice(max(lo - pad, 0), min(hi + pad, label.shape[a])))
    crop = lambda v: replace(v, array=np.ascontiguousarray(v.array[tuple(box)]))
    return crop(image), crop(label)


def spread_slices(present: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k labelled slices spread over the structure's extent: one random slice in each of k equal
    bins (stratified, seeded), the way a user labels a few slices across a structure."""
    edges = np.linspace(0, len(present), k + 1)
    picks = [int(present[rng.integers(int(np.floor(a)), max(int(np.floor(b)), int(np.floor(a)) + 1))])
             for a, b in zip(edges[:-1], edges[1:])]
    return sorted(set(picks))


def even_slices(candidates: list[int], count: int) -> list[int]:
    """`count` slices evenly spread over the candidates (deterministic)."""
    if count >= len(candidates):
        return list(candidates)
    return sorted({candidates[int(round(i))] for i in np.linspace(0, len(candidates) - 1, count)})


def add_noise(clean: np.ndarray, modality: str, level: float, norm: Normalizer,
              rng: np.random.Generator) -> np.ndarray:
    """Modality-typical noise at `level` of the normalised range (the families the training
    episodes use): Rician for MR, signal-dependent Gaussian for CT, speckle for US."""
    x = norm(clean)
    g = rng.standard_normal((2,) + x.shape).astype(np.float32) * level
    if modality == "mr":
        y = np.sqrt((x + g[0]) ** 2 + g[1] ** 2)
    elif modality == "ct":
        y = x + g[0] * np.sqrt(np.clip(x, 0.05, None))
    elif modality == "us":
        y = x * (1 + 2 * g[0])
    else:
        y = x + g[0]
    return norm.inverse(y)


def mask_on_image(mask_path: Path, image_path: Path) -> np.ndarray:
    """A mask from another subject in the same atlas space, put into the image's voxel order
    (BraTS subjects are stored RAS or LPS: DICOMOrient makes the arrays line up)."""
    image = sitk.ReadImage(str(image_path))
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    mask = sitk.DICOMOrient(sitk.ReadImage(str(mask_path)), code)
    array = sitk.GetArrayFromImage(mask) > 0
    if array.shape != sitk.GetArrayFromImage(image).shape:
        raise InputError(f"{mask_path}: shape {array.shape} does not match {image_path}")
    return array
