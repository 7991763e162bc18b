"""`medgen demo`: the shipped model on the shipped MNI152 sample, offline, with a picture.

Three things a Slicer user would do: label three axial slices and propagate grey/white matter
through the volume; denoise a volume with Rician noise from three (noisy, clean) slice pairs;
fill a hole with examples made from the image itself. Each prints its figure against the trivial
baseline (copy the nearest labelled slice; the noisy input; a biharmonic fill), so the demo never
claims more than it shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgen.prompts import inpaint_self_examples, pairs_from_volumes
from medgen.io.images import read_volume, write_volume
from medgen.infer.classical import nearest_copy
from medgen.infer.imagetasks import classical_fill
from medgen.metrics import dice, psnr
from medgen.infer.pipeline import RunOptions, run
from medgen.core.volume import Volume
from medgen.io.weights import load_model, resources_root

SAMPLE = "SampleData/mni152_{}_2mm.nii.gz"


def run_demo(out: Path, device: str = "auto", log=print) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    root = resources_root()
    t1 = read_volume(root / SAMPLE.format("t1"))
    tissue = read_volume(root / SAMPLE.format("tissue"), label=True)
    model, info = load_model(None)
    log(f"model {info.id}; sample {t1.shape} from the MNI152 template (nilearn)")
    scores: dict[str, float] = {}
    seg, given = _segment(model, t1, tissue, device, out, scores, log)
    noisy, den = _denoise(model, t1, device, out, scores, log)
    holed, filled, hole = _inpaint(model, t1, device, out, scores, log)
    _montage(out / "montage.png", t1, tissue, seg, given, noisy, den, holed, filled, hole)
    log(f"wrote outputs and {out / 'montage.png'}")
    return scores


def _segment(model, t1: Volume, tissue: Volume, device, out, scores, log):
    n = t1.shape[0]
    given = [int(n * f) for f in (0.3, 0.5, 0.7)]
    labels_only = tissue.with_array(np.zeros_like(tissue.array))
    labels_only.array[given] = tissue.array[given]
    examples = pairs_from_volumes(t1, labels_only, 0, given, "segment", "mr", own=True)
    seg = run(model, t1, examples, RunOptions("segment", 0, "mr", device))
    write_volume(seg, out / "segmentation.nii.gz")
    rest = np.setdiff1d(np.arange(n), given)
    base = nearest_copy(tissue.array, given)
    for value, name in ((1, "grey matter"), (2, "white matter")):
        ours = dice(seg.array[rest] == value, tissue.array[rest] == value)
        copy = dice(base[rest] == value, tissue.array[rest] == value)
        scores[f"dice_{value}"], scores[f"dice_copy_{value}"] = ours, copy
        log(f"segment {name}: Dice {ours:.3f} vs copy-nearest-slice {copy:.3f} (3 labelled axial slices)")
    return seg, given


def _denoise(model, t1: Volume, device, out, scores, log):
    rng = np.random.default_rng(0)
    clean = t1.array.astype(np.float32)
    sigma = 0.08 * float(np.percentile(clean, 99))
    noisy = np.sqrt((clean + rng.normal(0, sigma, clean.shape)) ** 2 + rng.normal(0, sigma, clean.shape) ** 2)
    noisy_vol = t1.with_array(noisy.astype(np.float32))
    n = t1.shape[0]
    idx = [int(n * f) for f in (0.35, 0.5, 0.65)]
    examples = pairs_from_volumes(noisy_vol, t1.with_array(clean), 0, idx, "denoise", "mr", own=False)
    den = run(model, noisy_vol, examples, RunOptions("denoise", 0, "mr", device))
    write_volume(noisy_vol, out / "noisy.nii.gz")
    write_volume(den, out / "denoised.nii.gz")
    peak = float(clean.max())
    scores["psnr_noisy"], scores["psnr_denoised"] = psnr(noisy, clean, peak), psnr(den.array, clean, peak)
    log(f"denoise: PSNR {scores['psnr_denoised']:.2f} dB vs noisy input {scores['psnr_noisy']:.2f} dB")
    return noisy, den.array


def _inpaint(model, t1: Volume, device, out, scores, log):
    hole = np.zeros(t1.shape, np.uint8)
    n, h, w = t1.shape
    hole[n // 2 - 3:n // 2 + 3, h // 2 - 8:h // 2 + 8, w // 2 - 10:w // 2 + 4] = 1
    mask = t1.with_array(hole)
    holed = t1.with_array(np.where(hole > 0, 0, t1.array).astype(np.float32))
    examples = inpaint_self_examples(holed, mask, 0, "mr")
    filled = run(model, holed, examples, RunOptions("inpaint", 0, "mr", device), mask=mask)
    write_volume(filled, out / "inpainted.nii.gz")
    inside = hole > 0
    ref = t1.array[inside].astype(np.float32)
    peak = float(t1.array.max())
    biharmonic = classical_fill(holed.array.astype(np.float32), inside)
    scores["psnr_hole_biharmonic"] = psnr(biharmonic[inside], ref, peak)
    scores["psnr_hole_inpainted"] = psnr(filled.array[inside], ref, peak)
    log(f"inpaint: PSNR in the hole {scores['psnr_hole_inpainted']:.2f} dB vs biharmonic fill "
        f"{scores['psnr_hole_biharmonic']:.2f} dB (the model starts from it and corrects it)")
    return holed.array, filled.array, hole


def _montage(path: Path, t1, tissue, seg, given, noisy, den, holed, filled, hole) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    cmap = ListedColormap([(0, 0, 0, 0), (1, 0.6, 0, 0.45), (0.2, 0.6, 1, 0.45)])
    n = t1.shape[0]
    queries = [int(n * f) for f in (0.2, 0.4, 0.6, 0.8)]
    mid = n // 2
    fig, axes = plt.subplots(3, 4, figsize=(12, 9))
    show = lambda ax, img, title, lab=None: (ax.imshow(img[::-1], cmap="gray"),
                                             lab is not None and ax.imshow(lab[::-1], cmap=cmap, vmin=0, vmax=2, interpolation="nearest"),
                                             ax.set_title(title, fontsize=9), ax.axis("off"))
    for ax, s in zip(axes[0, :3], given):
        show(ax, t1.array[s], f"example: slice {s} + labels", tissue.array[s])
    show(axes[0, 3], t1.array[mid], "template labels (reference)", tissue.array[mid])
    for ax, s in zip(axes[1], queries):
        show(ax, t1.array[s], f"propagated: slice {s}", seg.array[s])
    show(axes[2, 0], noisy[mid], "noisy input")
    show(axes[2, 1], den[mid], "denoised")
    row = int(np.nonzero(hole.any((1, 2)))[0].mean())
    show(axes[2, 2], holed[row], "hole")
    show(axes[2, 3], filled[row], "inpainted")
    fig.suptitle("MedicalGeneralist demo: MNI152 T1 (nilearn), shipped model", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
