"""Does the model read its examples? The bench's in-context section (issue: Dice must follow k and
the examples).

Two measurements that a model which only recognises the domain cannot pass:
- ambiguity: the same query slices with examples of *different targets on the same example
  images* (CT liver vs spleen vs kidney; MNI grey vs white matter; BraTS sub-regions; aseg
  structures). Each output is scored against its own target and against the others'; an output
  "follows its examples" on a query when it is closer (Dice) to its own target than to every other.
- shuffled examples: the same queries with the example pairs of another case (other images, other
  task); the Dice against the true target must fall far below the Dice with the true examples.
Queries and examples are slices of one volume, run slice by slice (independent mode), so no
propagation or prior channel can carry the answer: only the example pairs say what to segment.
The slope of Dice against k on held-out cross-subject sets comes from the cross-subject section.

`python -m medgen_dev.bench.incontext --cases dev NAME=MODEL ...` runs the same test on DEV_CASES,
other structures and images than the bench's, to choose checkpoints or settings without tuning on
the bench's rows (a difference of one to three queries is within what changes between case sets).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgen.core.volume import Volume, parse_axis
from medgen.io.images import read_volume
from medgen.metrics import dice
from medgen.prompts import pairs_from_volumes

Log = Callable[[str], None]


@dataclass(frozen=True)
class AmbiguityCase:
    name: str
    image: str  # relative to the data root
    targets: dict[str, tuple[str, tuple[int, ...] | None]]  # name -> (label file, values; None = >127 map)
    modality: str
    seen: str  # whether the model trained on these images and labels


CASES = (
    AmbiguityCase("TotalSegmentator CT: liver / spleen / right kidney", "totalseg_example/ct.nii.gz",
                  {"liver": ("totalseg_example/ct_seg_model.nii.gz", (5,)),
                   "spleen": ("totalseg_example/ct_seg_model.nii.gz", (1,)),
                   "kidney": ("totalseg_example/ct_seg_model.nii.gz", (2,))}, "ct", "yes"),
    AmbiguityCase("MNI152: grey / white matter", "mni152/t1.nii.gz",
                  {"grey matter": ("mni152/gm.nii.gz", None), "white matter": ("mni152/wm.nii.gz", None)},
                  "mr", "yes"),
    AmbiguityCase("BraTS TCGA-DU-7294: the two tumour sub-regions", "brats/TCGA-DU-7294/flair.nii.gz",
                  {"region 1": ("brats/TCGA-DU-7294/seg_fusion_algorithmic.nii.gz", (1,)),
                   "region 2": ("brats/TCGA-DU-7294/seg_fusion_algorithmic.nii.gz", (2,))}, "mr", "yes"),
    AmbiguityCase("voxelmorph aseg: ventricle / thalamus / putamen", "voxelmorph_brain/t1.nii.gz",
                  {"ventricle": ("voxelmorph_brain/aseg.nii.gz", (4,)),
                   "thalamus": ("voxelmorph_brain/aseg.nii.gz", (10,)),
                   "putamen": ("voxelmorph_brain/aseg.nii.gz", (12,))}, "mr", "yes"),
)

# Other structures or images than CASES, for choosing checkpoints and settings (module docstring); the
# last two are neighbours of like intensity, the kind of pair the bench's BraTS and MNI cases are.
_TS, _ASEG = "totalseg_example", "voxelmorph_brain/aseg.nii.gz"
DEV_CASES = (
    AmbiguityCase("TotalSegmentator MR: liver / spleen / right kidney", f"{_TS}/mr.nii.gz",
                  {"liver": (f"{_TS}/mr_seg_model.nii.gz", (5,)), "spleen": (f"{_TS}/mr_seg_model.nii.gz", (1,)),
                   "kidney": (f"{_TS}/mr_seg_model.nii.gz", (2,))}, "mr", "yes"),
    AmbiguityCase("TotalSegmentator CT: stomach / left kidney / pancreas", f"{_TS}/ct.nii.gz",
                  {"stomach": (f"{_TS}/ct_seg_model.nii.gz", (6,)), "kidney": (f"{_TS}/ct_seg_model.nii.gz", (3,)),
                   "pancreas": (f"{_TS}/ct_seg_model.nii.gz", (7,))}, "ct", "yes"),
    AmbiguityCase("voxelmorph aseg: left cortex / left white matter", "voxelmorph_brain/t1.nii.gz",
                  {"cortex": (_ASEG, (3,)), "white matter": (_ASEG, (2,))}, "mr", "yes"),
    AmbiguityCase("voxelmorph aseg: right ventricle / thalamus / putamen", "voxelmorph_brain/t1.nii.gz",
                  {"ventricle": (_ASEG, (43,)), "thalamus": (_ASEG, (49,)), "putamen": (_ASEG, (51,))}, "mr", "yes"),
    AmbiguityCase("voxelmorph aseg: right caudate / putamen / pallidum", "voxelmorph_brain/t1.nii.gz",
                  {"caudate": (_ASEG, (50,)), "putamen": (_ASEG, (51,)), "pallidum": (_ASEG, (52,))}, "mr", "yes"),
    AmbiguityCase("TotalSegmentator CT: aorta / inferior vena cava / portal vein", f"{_TS}/ct.nii.gz",
                  {"aorta": (f"{_TS}/ct_seg_model.nii.gz", (52,)), "vena cava": (f"{_TS}/ct_seg_model.nii.gz", (63,)),
                   "portal vein": (f"{_TS}/ct_seg_model.nii.gz", (64,))}, "ct", "yes"),
)


def _load(case: AmbiguityCase, root: Path) -> tuple[Volume, int, dict[str, np.ndarray]]:
    image = read_volume(root / case.image)
    axis = parse_axis("axial", image)
    masks = {}
    for name, (path, values) in case.targets.items():
        label = read_volume(root / path, label=values is not None).array
        mask = label > 127 if values is None else np.isin(label, values)
        masks[name] = np.moveaxis(mask, axis, 0)
    return image, axis, masks


def _slices(masks: dict[str, np.ndarray], k: int, n_query: int, min_pixels: int = 20) -> tuple[list[int], list[int]]:
    """Slices where every target is present: k spread examples, and queries in between them."""
    present = np.all([(m.sum((1, 2)) >= min_pixels) for m in masks.values()], axis=0)
    idx = np.nonzero(present)[0]
    picks = idx[np.linspace(0, len(idx) - 1, k + n_query).round().astype(int)]
    picks = sorted(set(int(p) for p in picks))
    examples = picks[::max(1, len(picks) // k)][:k]
    return examples, [p for p in picks if p not in examples][:n_query]


def _predict(model, image: Volume, axis: int, example_slices: list[int], mask: np.ndarray,
             queries: list[int], modality: str, device: str, method: str, source: Volume | None = None,
             source_axis: int | None = None, source_modality: str | None = None) -> tuple[np.ndarray, str]:
    """Segment the query slices from example pairs (the image's own slices, or another case's) by
    `method` ("model", or "auto": what a user gets); the mask and the method that made it."""
    from medgen.infer.pipeline import RunOptions, run_with_report
    from medgen.infer.segment import SegmentSettings

    src = source or image
    src_axis = axis if source_axis is None else source_axis
    labels = src.with_array(np.moveaxis(mask.astype(np.uint8), 0, src_axis))
    examples = pairs_from_volumes(src, labels, src_axis, example_slices, "segment", source_modality or modality,
                                  own=False)
    stack = np.moveaxis(np.take(image.array, queries, axis=axis), axis, 0)
    query = Volume(stack.astype(np.float32), image.spacing, image.origin, image.direction)
    out = run_with_report(model, query, examples, RunOptions("segment", 0, modality, device, method=method,
                                                             segment=SegmentSettings(mode="independent")))
    return out.volume.array > 0, out.report.estimates[0].chosen


def ambiguity(model, root: Path, device: str, log: Log, k: int = 3, n_query: int = 6,
              cases: tuple[AmbiguityCase, ...] = CASES, auto: bool = True) -> dict:
    """Rows per case: Dice of each target's output against its own and the other targets, for the
    model alone (the keys without prefix) and, with `auto`, for what a run gives (keys auto_*: the
    self-check's choice between the model and the pixel classifier per target, slicewise.py; four
    times the model's cost, so the CI's quick bench leaves it to Testing/test_slicewise.py)."""
    prefixes = ("", "auto_") if auto else ("",)
    loaded = [(c, *_load(c, root)) for c in cases if (root / c.image).is_file()]
    rows = []
    for ci, (case, image, axis, masks) in enumerate(loaded):
        ex, q = _slices(masks, k, n_query)
        donor_case, donor_image, donor_axis, donor_masks = loaded[(ci + 1) % len(loaded)]
        donor_mask = next(iter(donor_masks.values()))
        donor_ex, _ = _slices({"m": donor_mask}, k, 0)
        row = {"case": case.name, "seen": case.seen, "targets": list(masks), "k": k,
               "example_slices": ex, "query_slices": q, "shuffled_donor": donor_case.name}
        for prefix in prefixes:
            method = "auto" if prefix else "model"
            made = {t: _predict(model, image, axis, ex, m, q, case.modality, device, method) for t, m in masks.items()}
            own, other, follows = [], [], []
            for t, (pred, _) in made.items():
                for j, s in enumerate(q):
                    d = {u: dice(pred[j], masks[u][s]) for u in masks}
                    best_other = max(v for u, v in d.items() if u != t)
                    own.append(d[t]), other.append(best_other), follows.append(d[t] > best_other)
            shuffled = []
            for t, m in masks.items():
                pred = _predict(model, image, axis, donor_ex, donor_mask, q, case.modality, device, method,
                                source=donor_image, source_axis=donor_axis, source_modality=donor_case.modality)[0]
                shuffled += [dice(pred[j], m[s]) for j, s in enumerate(q)]
            row.update({f"{prefix}dice_own": float(np.mean(own)), f"{prefix}dice_best_other": float(np.mean(other)),
                        f"{prefix}follows_fraction": float(np.mean(follows)), "n": len(follows),
                        f"{prefix}dice_shuffled": float(np.mean(shuffled))})
            if prefix:
                row["auto_chosen"] = {t: chosen for t, (_, chosen) in made.items()}
            log(f"{case.name} ({method}): own {row[f'{prefix}dice_own']:.3f} vs best other "
                f"{row[f'{prefix}dice_best_other']:.3f}, follows {row[f'{prefix}follows_fraction']:.0%}; shuffled "
                f"examples {row[f'{prefix}dice_shuffled']:.3f}" + (f"; chose {row['auto_chosen']}" if prefix else ""))
        rows.append(row)
    summary = {}
    for prefix in prefixes:
        n = sum(r["n"] for r in rows)
        summary[f"{prefix}follows_fraction"] = (float(sum(r[f"{prefix}follows_fraction"] * r["n"] for r in rows) / n)
                                                if rows else None)
        summary[f"{prefix}dice_true_minus_shuffled"] = (float(np.mean([r[f"{prefix}dice_own"] - r[f"{prefix}dice_shuffled"]
                                                                       for r in rows])) if rows else None)
    return {"rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    """One Markdown table, a column per model: follows (queries) and true minus shuffled Dice."""
    from medgen.io.weights import load_model
    from medgen_dev.bench.data import load_config

    p = argparse.ArgumentParser(prog="python -m medgen_dev.bench.incontext", description="The ambiguity and "
                                "shuffled-examples test on the dev cases (or the bench's), one column per model.")
    p.add_argument("models", nargs="+", metavar="NAME=MODEL", help="a model id, folder or hf:// spec per column")
    p.add_argument("--cases", choices=("dev", "bench"), default="dev")
    p.add_argument("--config", default=None, help="bench configuration whose data_root holds the cases "
                   "(default: the shipped one, ../shared/data)")
    args = p.parse_args(argv)
    root = load_config(args.config).data_root
    cases = DEV_CASES if args.cases == "dev" else CASES
    results = {}
    for item in args.models:
        name, _, spec = item.partition("=")
        start = time.time()
        results[name] = ambiguity(load_model(spec or name, "cpu")[0], root, "cpu", print, cases=cases)
        print(f"{name}: {time.time() - start:.0f} s")
    names = list(results)
    cols = [(n, p) for n in names for p in ("", "auto_")]
    print("\n| case | " + " | ".join(f"{n} {'auto' if p else 'model'}" for n, p in cols) + " |\n|---|"
          + "---|" * len(cols))
    for i, case in enumerate(r["case"] for r in results[names[0]]["rows"]):
        cells = [f"{results[n]['rows'][i][p + 'follows_fraction'] * results[n]['rows'][i]['n']:.0f}/"
                 f"{results[n]['rows'][i]['n']}" for n, p in cols]
        print(f"| {case} | " + " | ".join(cells) + " |")
    for key, fmt in (("follows_fraction", "{:.1%}"), ("dice_true_minus_shuffled", "{:+.3f}")):
        print(f"| {key} | " + " | ".join(fmt.format(results[n]["summary"][p + key]) for n, p in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
