"""The model card's tables: held-out visible data, next to the trivial and classical baselines.

`python -m medgen_dev.bench.card MODEL [--ablation NAME=MODEL ...]` prints Markdown.
Held out from training (train.py's default holdout): pyradiomics brain2 (MR) and lung2 (CT) for
propagation, the BraTS-MET-AURORA subject for image tasks, BUSI clusters past the training limit
and DRIVE images 36-40 for cross-subject segmentation. A figure worse than its baseline is
printed as it is.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from medgen_dev.train.datasets import DEFAULT_DATA
from medgen.demo import dice, nearest_copy, psnr
from medgen.prompts import Example, inpaint_self_examples, pairs_from_volumes
from medgen.infer.imagetasks import classical_fill
from medgen.io.images import read_volume
from medgen.core.intensity import fit_normalizer
from medgen.infer.pipeline import RunOptions, run
from medgen.infer.segment import SegmentSettings
from medgen.core.volume import Volume


def _propagation(model, data: Path, stem: str, modality: str, k: int,
                 options: RunOptions | None = None) -> tuple[float, float]:
    """(ours, copy-nearest) Dice on the unlabelled slices, k labelled slices spread evenly."""
    img, lab, given = _held_volume(data, stem, k)
    examples = pairs_from_volumes(img, lab, 0, given, "segment", modality, own=True)
    out = run(model, img, examples, options or RunOptions("segment", 0, modality))
    rest = np.setdiff1d(np.arange(img.shape[0]), given)
    truth = lab.array[rest] > 0
    return dice(out.array[rest] > 0, truth), dice(nearest_copy(lab.array, given)[rest] > 0, truth)


def _held_volume(data: Path, stem: str, k: int) -> tuple[Volume, Volume, list[int]]:
    img = read_volume(data / "pyradiomics" / f"{stem}_image.nrrd")
    lab = read_volume(data / "pyradiomics" / f"{stem}_label.nrrd", label=True)
    lab = lab.with_array((lab.array > 0).astype(np.uint8))
    present = np.nonzero(lab.array.any((1, 2)))[0]
    given = sorted({int(present[int(i)]) for i in np.linspace(0, len(present) - 1, k + 2)[1:-1]})
    return img, lab, given


def _fill_dice(data: Path, stem: str, k: int) -> float:
    """Slicer's fill between slices (ITK MCI) on the same slices; empty outside the span."""
    from medgen.infer.interpolate import fill_between_slices

    img, lab, given = _held_volume(data, stem, k)
    rest = np.setdiff1d(np.arange(img.shape[0]), given)
    if len(given) < 2:
        return float("nan")  # Slicer's tool needs two labelled slices
    return dice(fill_between_slices(lab.array > 0, given)[rest], lab.array[rest] > 0)


def _aurora(data: Path) -> dict[str, Volume]:
    sub = data / "brats" / "BraTS-MET-AURORA-example"
    return {c: read_volume(sub / f"{c}.nii.gz") for c in ("t1", "t2")}


def _image_tasks(model, data: Path) -> list[tuple[str, float, float, float, float, str]]:
    """(task, PSNR ours, PSNR baseline, SSIM ours, SSIM baseline, baseline) on 8 held-out slices."""
    vols = _aurora(data)
    t1 = vols["t1"].with_array(vols["t1"].array.astype(np.float32))
    n = t1.shape[0]
    block = slice(n // 2 - 4, n // 2 + 4)  # 8 held-out slices; examples come from elsewhere
    crop = lambda v: replace(v, array=np.ascontiguousarray(v.array[block]))
    rows = []
    clean = crop(t1)
    peak = float(np.percentile(clean.array, 99.9))
    rng = np.random.default_rng(0)
    sigma = 0.06 * float(np.percentile(clean.array, 99.5))
    rician = lambda a: np.sqrt((a + rng.normal(0, sigma, a.shape)) ** 2
                               + rng.normal(0, sigma, a.shape) ** 2).astype(np.float32)
    noisy_arr = rician(clean.array)
    ex_idx = [int(n * 0.3), int(n * 0.4), int(n * 0.6), int(n * 0.7)]
    ex = pairs_from_volumes(t1.with_array(rician(t1.array)), t1, 0, ex_idx, "denoise", "mr", own=False)
    out = run(model, clean.with_array(noisy_arr), ex, RunOptions("denoise", 0, "mr"))
    rows.append(("denoise, Rician 6%", *_scores(out.array, noisy_arr, clean.array, peak), "noisy input"))
    hole = np.zeros(clean.shape, bool)
    h, w = clean.shape[1:]
    hole[:, h // 2 - 12:h // 2 + 12, w // 2 - 18:w // 2 + 6] = True
    holed = clean.with_array(np.where(hole, 0, clean.array).astype(np.float32))
    moved = _moved(hole, t1.shape)
    ex = inpaint_self_examples(t1.with_array(np.where(moved, 0, t1.array)), t1.with_array(moved.astype(np.uint8)), 0, "mr")
    out = run(model, holed, ex, RunOptions("inpaint", 0, "mr"), mask=clean.with_array(hole.astype(np.uint8)))
    fill = classical_fill(holed.array, hole)
    p_ours, p_base = psnr(out.array[hole], clean.array[hole], peak), psnr(fill[hole], clean.array[hole], peak)
    _, _, s_ours, s_base = _scores(out.array, fill, clean.array, peak)
    rows.append(("inpaint, 24x24 mm hole (PSNR in the hole)", p_ours, p_base, s_ours, s_base, "biharmonic fill"))
    t2 = crop(vols["t2"].with_array(vols["t2"].array.astype(np.float32)))
    ex = pairs_from_volumes(vols["t1"], vols["t2"], 0, ex_idx, "synthesize", "mr", own=False)
    out = run(model, clean, ex, RunOptions("synthesize", 0, "mr"))
    rows.append(("synthesize T1→T2", *_scores(out.array, _linear_map(ex, clean.array), t2.array,
                                              float(np.percentile(t2.array, 99.9))), "linear intensity map"))
    return rows


def _scores(ours: np.ndarray, base: np.ndarray, ref: np.ndarray, peak: float) -> tuple[float, ...]:
    """PSNR and mean per-slice SSIM (scikit-image, data range = the reference's peak)."""
    from skimage.metrics import structural_similarity

    ssim = lambda x: float(np.mean([structural_similarity(a, b, data_range=peak)
                                    for a, b in zip(x.astype(np.float64), ref.astype(np.float64))]))
    return psnr(ours, ref, peak), psnr(base, ref, peak), ssim(ours), ssim(base)


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


Pair = tuple[Path, Path]  # (image, mask) files


def _busi(data: Path, queries: int = 20) -> tuple[list[Pair], list[Pair]]:
    """Lesion images, one per near-duplicate cluster: the first 200 trained on, the next held out."""
    seen, lesion = set(), []
    for e in json.loads((data / "busi" / "index.json").read_text())["cases"]:
        if e["class"] != "normal" and e["cluster"] not in seen:
            seen.add(e["cluster"])
            lesion.append((data / "busi" / e["image"], data / "busi" / e["mask"]))
    return lesion[:200], lesion[200:200 + queries]


def _drive(data: Path) -> tuple[list[Pair], list[Pair]]:
    """DRIVE vessels: images 21-35 are examples (trained on), 36-40 held out from training."""
    pairs = [(p, data / "drive" / "vessels" / p.name) for p in sorted((data / "drive" / "images").glob("*.png"))]
    return [p for p in pairs if int(p[0].stem) < 36], [p for p in pairs if int(p[0].stem) >= 36]


def _cross(model, train: list[Pair], held: list[Pair], k: int, modality: str) -> tuple[float, float]:
    """(ours, mean of example masks) Dice: k examples spread over `train`, every held-out query."""
    binary = lambda path: (lambda v: v.with_array((v.array > 0).astype(np.uint8)))(read_volume(path, label=True))
    examples = []
    for i in np.linspace(0, len(train) - 1, min(k, len(train))):
        img, msk = train[int(round(i))]
        examples += pairs_from_volumes(read_volume(img), binary(msk), 0, None, "segment", modality, own=False)
    ours, prior = [], []
    for img, msk in held:
        truth = binary(msk).array > 0
        out = run(model, read_volume(img), examples, RunOptions("segment", 0, modality))
        ours.append(dice(out.array > 0, truth))
        prior.append(dice(_mean_mask(examples, truth.shape[1:])[None], truth))
    return float(np.mean(ours)), float(np.mean(prior))


def _mean_mask(examples: list[Example], shape: tuple[int, int]) -> np.ndarray:
    """Baseline: the examples' masks resized to the query and averaged, thresholded at 0.5."""
    from monai.transforms import Resize
    masks = [np.asarray(Resize(shape, mode="nearest")((e.target > 0)[None].astype(np.float32)))[0]
             for e in examples]
    return np.mean(masks, axis=0) >= 0.5


HELD_VOLUMES = (("lung2", "ct", (1, 3, 5)), ("brain2", "mr", (1,)))  # brain2's lesion spans 3 slices
TTA_STEPS = 20


def propagation_table(model, data: Path = DEFAULT_DATA) -> str:
    rows = ["| volume (held out) | labelled slices | copy nearest | fill between slices | ours, per slice "
            "(no AR) | ours, propagation (AR) | ours, AR + TTA |", "|---|---|---|---|---|---|---|"]
    for stem, mod, ks in HELD_VOLUMES:
        for k in ks:
            ar, copy = _propagation(model, data, stem, mod, k)
            flat, _ = _propagation(model, data, stem, mod, k,
                                   RunOptions("segment", 0, mod, segment=SegmentSettings(mode="independent")))
            tta, _ = _propagation(model, data, stem, mod, k, RunOptions("segment", 0, mod, adapt_steps=TTA_STEPS))
            fill = _fill_dice(data, stem, k)
            rows.append(f"| pyradiomics {stem} ({mod}) | {k} | {copy:.3f} | {_fmt(fill)} | {flat:.3f} | "
                        f"{ar:.3f} | {tta:.3f} |")
    return "\n".join(rows)


def cross_subject_table(model, data: Path = DEFAULT_DATA) -> str:
    rows = ["| data | examples | mean of example masks | ours |", "|---|---|---|---|"]
    for name, (train, held), mod in (("BUSI, 20 held-out clusters", _busi(data), "us"),
                                     ("DRIVE, images 36-40", _drive(data), "other")):
        for k in (1, 4, 8, 16):
            ours, base = _cross(model, train, held, k, mod)
            rows.append(f"| {name} | {min(k, len(train))} | {base:.3f} | {ours:.3f} |")
    return "\n".join(rows)


def image_table(model, data: Path = DEFAULT_DATA) -> str:
    rows = ["| task (BraTS-MET-AURORA T1, 8 held-out slices) | PSNR ours | PSNR baseline | SSIM ours | "
            "SSIM baseline | baseline |", "|---|---|---|---|---|---|"]
    for name, p1, p0, s1, s0, what in _image_tasks(model, data):
        rows.append(f"| {name} | {p1:.2f} | {p0:.2f} | {s1:.3f} | {s0:.3f} | {what} |")
    return "\n".join(rows)


def ablation_table(models: dict[str, object], data: Path = DEFAULT_DATA) -> str:
    """The same short fine-tune with one ingredient removed, scored on the held-out data."""
    rows = ["| run | lung2 k=1 | lung2 k=3 | brain2 k=1 | BUSI k=8 | DRIVE k=4 | denoise PSNR |",
            "|---|---|---|---|---|---|---|"]
    for name, model in models.items():
        cells = [_propagation(model, data, "lung2", "ct", 1)[0], _propagation(model, data, "lung2", "ct", 3)[0],
                 _propagation(model, data, "brain2", "mr", 1)[0], _cross(model, *_busi(data), 8, "us")[0],
                 _cross(model, *_drive(data), 4, "other")[0]]
        denoise = _image_tasks(model, data)[0][1]
        rows.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {denoise:.2f} |")
    return "\n".join(rows)


def _fmt(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.3f}"


def card_tables(model, ablations: dict[str, object] | None = None, data: Path = DEFAULT_DATA) -> str:
    parts = ["### In-volume propagation (Dice on the unlabelled slices)", propagation_table(model, data),
             "### Cross-subject 2D segmentation (Dice)", cross_subject_table(model, data),
             "### Image tasks", image_table(model, data)]
    if ablations:
        parts += ["### Ablations (equal short fine-tunes from the same start)", ablation_table(ablations, data)]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    from medgen.io.weights import load_model

    parser = argparse.ArgumentParser(description="print the model card's tables (Markdown)")
    parser.add_argument("model", nargs="?", default=None, help="model id or folder (default: the default model)")
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME=MODEL",
                        help="a run to put in the ablation table (repeatable)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    args = parser.parse_args(argv)
    ablations = {a.split("=", 1)[0]: load_model(a.split("=", 1)[1])[0] for a in args.ablation}
    print(card_tables(load_model(args.model)[0], ablations, Path(args.data)), end="")


if __name__ == "__main__":
    main()
