"""Validation on held-out visible data, next to the trivial baselines, as a Markdown table.

The figures go into the model card. Held out from the starter training (train.py's default
holdout): pyradiomics brain2 (MR) and lung2 (CT) for propagation, the BraTS-MET-AURORA subject for
image tasks, BUSI clusters past the training limit for cross-subject segmentation. A figure worse
than its baseline is printed as it is.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from .datasets import DEFAULT_DATA
from .demo import dice, nearest_copy, psnr
from .examples import Example, inpaint_self_examples, pairs_from_volumes
from .imagetasks import classical_fill
from .imageio import read_volume
from .intensity import fit_normalizer
from .pipeline import RunOptions, run
from .volume import Volume


def _propagation(model, data: Path, stem: str, modality: str, k: int) -> tuple[float, float]:
    img = read_volume(data / "pyradiomics" / f"{stem}_image.nrrd")
    lab = read_volume(data / "pyradiomics" / f"{stem}_label.nrrd", label=True)
    lab = lab.with_array((lab.array > 0).astype(np.uint8))
    present = np.nonzero(lab.array.any((1, 2)))[0]
    given = sorted({int(present[int(i)]) for i in np.linspace(0, len(present) - 1, k + 2)[1:-1]})
    examples = pairs_from_volumes(img, lab, 0, given, "segment", modality, own=True)
    out = run(model, img, examples, RunOptions("segment", 0, modality))
    rest = np.setdiff1d(np.arange(img.shape[0]), given)
    truth = lab.array[rest] > 0
    return dice(out.array[rest] > 0, truth), dice(nearest_copy(lab.array, given)[rest] > 0, truth)


def _aurora(data: Path) -> dict[str, Volume]:
    sub = data / "brats" / "BraTS-MET-AURORA-example"
    return {c: read_volume(sub / f"{c}.nii.gz") for c in ("t1", "t2")}


def _image_tasks(model, data: Path) -> list[tuple[str, str, float, float, str]]:
    vols = _aurora(data)
    t1 = vols["t1"].with_array(vols["t1"].array.astype(np.float32))
    n = t1.shape[0]
    block = slice(n // 2 - 4, n // 2 + 4)  # 8 held-out slices; examples come from elsewhere
    crop = lambda v: replace(v, array=np.ascontiguousarray(v.array[block]))
    rows = []
    clean = crop(t1)
    rng = np.random.default_rng(0)
    sigma = 0.06 * float(np.percentile(clean.array, 99.5))
    noisy_arr = np.sqrt((clean.array + rng.normal(0, sigma, clean.shape)) ** 2
                        + rng.normal(0, sigma, clean.shape) ** 2).astype(np.float32)
    noisy = clean.with_array(noisy_arr)
    ex_idx = [int(n * 0.3), int(n * 0.4), int(n * 0.6), int(n * 0.7)]
    noisy_full = t1.with_array(np.sqrt((t1.array + rng.normal(0, sigma, t1.shape)) ** 2
                                       + rng.normal(0, sigma, t1.shape) ** 2).astype(np.float32))
    ex = pairs_from_volumes(noisy_full, t1, 0, ex_idx, "denoise", "mr", own=False)
    out = run(model, noisy, ex, RunOptions("denoise", 0, "mr"))
    peak = float(np.percentile(clean.array, 99.9))
    rows.append(("denoise", "mr", psnr(out.array, clean.array, peak), psnr(noisy_arr, clean.array, peak),
                 "noisy input"))
    hole = np.zeros(clean.shape, bool)
    h, w = clean.shape[1:]
    hole[:, h // 2 - 12:h // 2 + 12, w // 2 - 18:w // 2 + 6] = True
    holed = clean.with_array(np.where(hole, 0, clean.array).astype(np.float32))
    mask = clean.with_array(hole.astype(np.uint8))
    ex = inpaint_self_examples(t1.with_array(np.where(_moved(hole, t1.shape), 0, t1.array)),
                               t1.with_array(_moved(hole, t1.shape).astype(np.uint8)), 0, "mr")
    out = run(model, holed, ex, RunOptions("inpaint", 0, "mr"), mask=mask)
    rows.append(("inpaint, 24x24 mm hole, PSNR in the hole", "mr", psnr(out.array[hole], clean.array[hole], peak),
                 psnr(classical_fill(holed.array, hole)[hole], clean.array[hole], peak), "biharmonic fill"))
    t2 = crop(vols["t2"].with_array(vols["t2"].array.astype(np.float32)))
    ex = pairs_from_volumes(vols["t1"], vols["t2"], 0, ex_idx, "synthesize", "mr", own=False)
    out = run(model, clean, ex, RunOptions("synthesize", 0, "mr"))
    peak2 = float(np.percentile(t2.array, 99.9))
    rows.append(("synthesize T1→T2", "mr", psnr(out.array, t2.array, peak2),
                 psnr(_linear_map(ex, clean.array), t2.array, peak2), "linear intensity map"))
    return rows


def _moved(hole: np.ndarray, shape: tuple) -> np.ndarray:
    """The evaluation hole placed on the first slices of the full volume (far from the test block),
    so that the examples made from intact slices never include the test slices' truth."""
    out = np.zeros(shape, bool)
    out[int(shape[0] * 0.25):int(shape[0] * 0.25) + hole.shape[0]] = hole
    return out


def _linear_map(examples: list[Example], image: np.ndarray) -> np.ndarray:
    """Baseline for synthesis: least-squares linear map fitted on the example pairs' brain voxels."""
    x = np.concatenate([e.image.ravel() for e in examples])
    y = np.concatenate([e.target.ravel() for e in examples])
    keep = x > 0
    a, b = np.polyfit(x[keep], y[keep], 1)
    return np.where(image > 0, a * image + b, 0)


def _busi(model, data: Path, k: int, queries: int = 20) -> tuple[float, float]:
    index = json.loads((data / "busi" / "index.json").read_text())["cases"]
    seen, lesion = set(), []
    for e in index:
        if e["class"] != "normal" and e["cluster"] not in seen:
            seen.add(e["cluster"])
            lesion.append(e)
    train, held = lesion[:200], lesion[200:200 + queries]
    ctx = [train[int(i)] for i in np.linspace(0, len(train) - 1, k)]
    load = lambda e, key: read_volume(data / "busi" / e[key], label=key == "mask")
    examples = []
    for e in ctx:
        img, msk = load(e, "image"), load(e, "mask")
        examples += pairs_from_volumes(img, msk.with_array((msk.array > 0).astype(np.uint8)), 0, None,
                                       "segment", "us", own=False)
    ours, prior = [], []
    mean_mask = None
    for e in held:
        img, msk = load(e, "image"), load(e, "mask")
        out = run(model, img, examples, RunOptions("segment", 0, "us"))
        truth = msk.array > 0
        ours.append(dice(out.array > 0, truth))
        if mean_mask is None or mean_mask.shape != truth.shape:
            mean_mask = _mean_mask(examples, truth.shape[1:])
        prior.append(dice(mean_mask[None], truth))
    return float(np.mean(ours)), float(np.mean(prior))


def _mean_mask(examples: list[Example], shape: tuple[int, int]) -> np.ndarray:
    """Baseline: the examples' masks resized to the query and averaged, thresholded at 0.5."""
    from monai.transforms import Resize
    masks = [np.asarray(Resize(shape, mode="nearest")((e.target > 0)[None].astype(np.float32)))[0]
             for e in examples]
    return np.mean(masks, axis=0) >= 0.5


def validation_table(model, data: Path = DEFAULT_DATA) -> str:
    lines = ["| task | modality | data (held out) | ours | baseline | baseline is |", "|---|---|---|---|---|---|"]
    for stem, mod, ks in (("brain2", "mr", (1,)), ("lung2", "ct", (1, 3))):  # brain2: 3 labelled slices
        for k in ks:
            ours, base = _propagation(model, data, stem, mod, k)
            lines.append(f"| propagate, {k} labelled slice(s) (Dice) | {mod} | pyradiomics {stem} | "
                         f"{ours:.3f} | {base:.3f} | copy nearest labelled slice |")
    for name, mod, ours, base, what in _image_tasks(model, data):
        lines.append(f"| {name} (PSNR dB) | {mod} | BraTS-MET-AURORA | {ours:.2f} | {base:.2f} | {what} |")
    for k in (4, 8):
        ours, base = _busi(model, data, k)
        lines.append(f"| cross-subject segment, {k} examples (Dice) | us | BUSI, 20 unseen clusters | "
                     f"{ours:.3f} | {base:.3f} | mean of example masks |")
    return "\n".join(lines)


if __name__ == "__main__":
    from .weights import load_model
    print(validation_table(load_model(sys.argv[1] if len(sys.argv) > 1 else None)[0]))
