"""The benchmark's outputs: results.json (every figure), BENCHMARKS.md (tables), PNG plots and
montages, and the hardware and date they came from.

The report states, beside every figure, whether the model saw that data in training, and never
rounds a loss into a win: the main table gives the best baseline and the difference to it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

from medgen_dev.bench.baselines import CROSS_BASELINES, PROPAGATION_BASELINES

CONTEXT_ONLY = "ours, context only"  # cross-subject: the network alone, without adaptation
SELF = ("ours", "auto", CONTEXT_ONLY)  # the model, its ablation and the self-check's choice: not baselines
from medgen_dev.bench.data import REPO_ROOT, BenchConfig

HEADER = """# Benchmarks

Every figure in this file, in README.md and in the model cards comes from one command:

```bash
medgen bench                 # full run on ../shared/data (Resources/Bench/shared_data.json) -> docs/
medgen bench --quick         # the CI subset (a few minutes on a 2-core CPU) -> ./medgen-bench-quick/
medgen bench --data DIR      # your own data, in the layout below
# options: --config FILE, --out DIR, --device auto|cpu|cuda|mps, --model ID|PATH|hf://...,
#          --sections propagation,cross_subject,image_tasks,speed, --volumes 64x128x128,...
```

It writes `BENCHMARKS.md` (this file), `bench/results.json` (every number below, with the slices,
seeds and settings that produced it) and `bench/*.png` (plots and montages) into `--out`.

## What is measured

1. **In-volume propagation** — for each labelled 3D structure, k in {1, 3, 5} labelled slices
   (one random slice in each of k equal bins of the structure's extent along the axial axis,
   fixed seed) are given; the rest of the volume is predicted. Dice and HD95 (MONAI
   `compute_dice`, `compute_hausdorff_distance`, percentile 95, in mm) are computed over all
   slices except the given ones; "Dice between" scores only the slices between the first and
   last given slice (interpolation, the case "Fill between slices" is made for). Baselines:
   *nearest slice copy* (every slice takes the nearest labelled slice, to the ends of the
   volume), *fill between slices* (ITK `MorphologicalContourInterpolator`, the algorithm behind
   Slicer's Segment Editor effect, default settings: it does not extrapolate beyond the outermost
   labelled slices, so with k = 1 it adds nothing), *registration* (SimpleITK fast symmetric
   forces demons from slice to slice carrying the mask outward; between two labelled slices both
   directions are blended by distance; open ends continue until the carried mask vanishes).
2. **Cross-subject 2D** — k in {1, 4, 8, 16} example pairs from other subjects (a seeded random
   draw per query, nested: the k = 4 set is part of the k = 8 set) -> each query; Dice. Baselines:
   *mean of example masks* (resized to the query, averaged, >= 0.5) and *multi-atlas* (each
   example registered to the query with a SimpleITK affine, Mattes mutual information, three
   resolutions; masks fused by SimpleITK `LabelVoting`, ties to background).
3. **Denoising, inpainting, synthesis** — PSNR over the scored voxels and SSIM (scikit-image)
   averaged over the scored voxels of each slice's SSIM map. Examples and scored slices are
   disjoint and at least 3 slices apart. Baselines: scikit-image non-local means and
   total-variation (Chambolle) denoising, their parameter picked on the same example pairs the
   model gets; biharmonic inpainting; histogram matching and a least-squares linear intensity map
   fitted on the example pairs for synthesis. Noise is simulated with the modality's family
   (Rician MR, signal-dependent Gaussian CT) at the stated fraction of the normalised range.
4. **Speed and memory** — GFLOPs per query slice against k (torch `FlopCounterMode`), and
   whole-volume seconds, seconds per slice and peak resident memory of a fresh process (peak GPU
   memory on CUDA) for the shipped MNI152 sample resampled to each size, grey and white matter
   segmented from k labelled slices. The same harness runs a UniverSeg-sized reference network
   (UniverSeg's architecture: CrossBlocks of 64 features, 1.18 M parameters, 128^2 inputs,
   random weights, which do not change its cost), so the ratio is measured on one machine in one
   run. Where a reference run would take too long, it times a central slab of slices and
   extrapolates (marked).

Rules: labels made by algorithms (FreeSurfer, TotalSegmentator, BraTS fusion) are pseudo-labels:
figures on them are **agreement** with that tool, not accuracy. Every row says whether the model
saw the data in training ("seen"): only "no" rows measure generalisation; "yes" rows show
behaviour on familiar volumes (for in-volume propagation the model saw those very volumes and
labels while training). Nothing is tuned on scored material.

## Dataset layout for your own data (`--data DIR`)

```
DIR/
  meta.json                        optional: {"modality": "ct|mr|us|xray|other", "axis": "axial",
                                              "seen_in_training": "unknown", "noise": 0.05}
  3d/<case>/image.nii.gz           3D: image + label volume per case (NIfTI, NRRD or MHA);
  3d/<case>/label.nii.gz               every non-zero label value is one structure to propagate;
                                       the image is also used for simulated-noise denoising
  3d/<case>/mask.nii.gz            optional: a region to inpaint (non-zero = hole)
  2d/<set>/images/<id>.png         2D: image + mask pairs with the same file name; each image in
  2d/<set>/masks/<id>.png              turn is the query, the examples come from the others
  paired/<case>/input.nii.gz       paired: input + target on the same grid (default task
  paired/<case>/target.nii.gz          synthesize; paired/<case>/meta.json {"task": "denoise"}
                                       for noisy -> clean pairs)
```

The configuration file (`--config`, e.g. `Resources/Bench/shared_data.json`) names the same
things explicitly: `data_root` (relative to the file), `propagation.structures[]` (`image`,
`label`, `values`, `modality`, `axis`, `seen_in_training`, `labels_by`, `quick`),
`cross_subject.sets[]` (`image_pattern`/`mask_pattern` with `{}` for an id, `queries`,
`examples`, `seen_queries`, `seen_examples`), `image_tasks.cases[]` (`task`, `image`, `target`,
`mask`, `noise`, `foreground_above`), `speed` (`sizes`, `k`, `tasks`, `slab`) and `quick`
(the CI subset's settings).
"""


# -- environment ------------------------------------------------------------------------------------
def environment(info, cfg: BenchConfig, quick: bool, device: str) -> dict:
    """Hardware, software, model and configuration: what a reader needs to reproduce a figure."""
    from medgen.io.weights import file_sha256

    return {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": _cpu_name(), "cpu_cores": os.cpu_count(), "memory_gb": _memory_gb(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": _git("rev-parse", "--short", "HEAD"), "git_dirty": bool(_git("status", "--porcelain")),
            "engine_sha256": _engine_hash(),
            "model": info.id, "model_sha256": file_sha256(info.weights_path),
            "config": cfg.source, "quick": quick, "device": device, "seed": cfg.seed}


def _engine_hash() -> str:
    """sha256 over the engine's source files as they are now: identifies the code even when the
    run happened on uncommitted changes."""
    import hashlib

    import medgen

    root = Path(medgen.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        return round(kb / 2 ** 20, 1)
    except (OSError, IndexError, ValueError):
        return None


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# -- aggregation ------------------------------------------------------------------------------------
def propagation_summary(rows: list[dict]) -> list[dict]:
    """Mean Dice / HD95 / Dice-between per (seen, k, method) over the scored structures."""
    out = []
    scored = [r for r in rows if "methods" in r]
    for seen in ("no", "yes", "unknown"):
        for k in sorted({r["k"] for r in scored}):
            group = [r for r in scored if r["seen"] == seen and r["k"] == k]
            if not group:
                continue
            for method in group[0]["methods"]:
                vals = [r["methods"][method] for r in group]
                between = [v["dice_between"] for v in vals if "dice_between" in v]
                out.append({"seen": seen, "k": k, "method": method, "n": len(group),
                            "structures": [r["structure"] for r in group],
                            "dice": float(np.mean([v["dice"] for v in vals])),
                            "dice_sd": float(np.std([v["dice"] for v in vals])),
                            "hd95": float(np.mean([v["hd95"] for v in vals])),
                            "empty": int(sum(v["empty"] for v in vals)),
                            "dice_between": float(np.mean(between)) if between else None,
                            "n_between": len(between)})
    return out


def cross_summary(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["set"] for r in rows):
        group = [r for r in rows if r["set"] == name]
        for method in group[0]["methods"]:
            for k in group[0]["methods"][method]:
                vals = [r["methods"][method][k] for r in group]
                out.append({"set": name, "seen_queries": group[0]["seen_queries"],
                            "seen_examples": group[0]["seen_examples"], "k": int(k), "method": method,
                            "n": len(vals), "dice": float(np.mean(vals)), "dice_sd": float(np.std(vals))})
    return out


# -- writing ----------------------------------------------------------------------------------------
def write_report(results: dict, pictures: dict, out: Path) -> Path:
    """results.json, plots, montages and BENCHMARKS.md under `out`; returns the report's path."""
    out = Path(out)
    figs = out / "bench"
    figs.mkdir(parents=True, exist_ok=True)
    if "propagation" in results:
        results["propagation"]["summary"] = propagation_summary(results["propagation"]["rows"])
        results["propagation"]["calibration"] = calibration(results["propagation"]["rows"])
        results["propagation"]["calibration_loo"] = calibration(results["propagation"]["rows"], "loo")
    if "cross_subject" in results:
        results["cross_subject"]["summary"] = cross_summary(results["cross_subject"]["rows"])
    (figs / "results.json").write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    images = draw_all(results, pictures, figs)
    text = HEADER + "\n" + "\n".join(_sections(results, images)) + "\n"
    report = out / "BENCHMARKS.md"
    report.write_text(text)
    return report


def _json_default(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value)} is not JSON serialisable")


def _sections(results: dict, images: dict[str, str]) -> list[str]:
    m = results["meta"]
    lines = ["## This run", "",
             f"- date: {m['date_utc']}; total {m['seconds'] / 60:.1f} min"
             f"{' (quick subset: not the published figures)' if m['quick'] else ''}",
             f"- hardware: {m['cpu']}, {m['cpu_cores']} cores, {m['memory_gb']} GB RAM, "
             f"GPU: {m['gpu'] or 'none'}; torch {m['torch']} ({m['torch_threads']} threads), "
             f"Python {m['python']}, {m['platform']}",
             f"- model: `{m['model']}` (sha256 {m['model_sha256'][:12]}); code at git {m['git_commit']}"
             f"{' with local changes' if m['git_dirty'] else ''} (engine sources sha256 {m.get('engine_sha256', '')[:12]}); configuration `{_rel(m['config'])}`; "
             f"device {m['device']}; seed {m['seed']}", ""]
    lines += ["## Main table: the model against each baseline", ""] + main_table(results) + [""]
    if "propagation" in results:
        lines += _propagation_section(results["propagation"], images)
    if "cross_subject" in results:
        lines += _cross_section(results["cross_subject"], images)
    if "in_context" in results or "cross_subject" in results:
        lines += in_context_section(results)
    if "image_tasks" in results:
        lines += _image_section(results["image_tasks"], images)
    if "speed" in results:
        lines += _speed_section(results["speed"], images)
    return lines + _limits(results)


PSEUDO = ("automatic", "model", "algorithm", "fusion", "freesurfer", "totalsegmentator")


def _limits(results: dict) -> list[str]:
    """What this run's figures do not show, generated from the run itself."""
    out = ["## Limits of this run", ""]
    rows = [r for r in results.get("propagation", {}).get("rows", []) if "methods" in r]
    if rows:
        held = sorted({r["structure"] for r in rows if r["seen"] == "no"})
        seen = sorted({r["structure"] for r in rows if r["seen"] == "yes"})
        pseudo = sorted({r["structure"] for r in rows if any(w in r["labels_by"].lower() for w in PSEUDO)})
        skipped = [r for r in results["propagation"]["rows"] if "skipped" in r]
        out.append(f"- Propagation: {len(held)} structure(s) held out from training ({', '.join(held) or 'none'}); "
                   f"{len(seen)} seen in training, where the model trained on those very volumes and labels: "
                   "their rows show behaviour on familiar data, not generalisation.")
        if pseudo:
            out.append(f"- Pseudo-labels (agreement with the tool that made them, not accuracy): {', '.join(pseudo)}.")
        if skipped:
            out.append(f"- {len(skipped)} propagation row(s) skipped because k labelled slices would leave no "
                       "labelled slice to score (" + "; ".join(f"{r['structure']} k={r['k']}" for r in skipped) + ").")
    if results.get("image_tasks", {}).get("rows"):
        out.append("- Image tasks run on a volume made of the scored slices only (the tasks are slice by slice; "
                   "the input's intensity normaliser is then fitted on those slices). Noise is simulated; "
                   "the inpainting hole is a real BraTS task mask moved to another subject.")
    vols = results.get("speed", {}).get("volumes", [])
    if vols:
        extra = [v for v in vols if v["extrapolated"]]
        if extra:
            out.append(f"- Speed: {len(extra)} of {len(vols)} volume timings timed a central slab and were "
                       "extrapolated linearly (marked in the table); our propagation is always timed whole.")
        if not any(v["device"].startswith("cuda") for v in vols):
            out.append("- No CUDA GPU on this machine: GPU figures are absent (the command adds them when one is present).")
    return out + [""]


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def main_table(results: dict) -> list[str]:
    """One row per benchmark group: ours, the best baseline, the difference, all baselines."""
    lines = ["| benchmark | data (n) | seen in training | metric | ours | best baseline | ours − best | all baselines "
             "| auto (self-check) | auto − best single |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("propagation", {}).get("summary", []):
        if r["method"] != "ours":
            continue
        group = {o["method"]: o["dice"] for o in results["propagation"]["summary"]
                 if o["seen"] == r["seen"] and o["k"] == r["k"]}
        lines.append(_main_row(f"propagation, k={r['k']} labelled slices", _structures(r), r["seen"],
                               "Dice", r["dice"], [(m, v) for m, v in group.items() if m not in SELF],
                               auto=group.get("auto")))
    for r in results.get("cross_subject", {}).get("summary", []):
        if r["method"] != "ours":
            continue
        others = [o for o in results["cross_subject"]["summary"]
                  if o["set"] == r["set"] and o["k"] == r["k"] and o["method"] not in SELF]
        lines.append(_main_row(f"cross-subject 2D, k={r['k']} examples", f"{r['set']} ({r['n']} queries)",
                               f"queries {r['seen_queries']}, examples {r['seen_examples']}", "Dice",
                               r["dice"], [(o["method"], o["dice"]) for o in others]))
    for r in results.get("image_tasks", {}).get("rows", []):
        others = [(m, v["psnr"]) for m, v in r["methods"].items() if m not in SELF + ("noisy input",)]
        auto = r["methods"].get("auto", {}).get("psnr")
        lines.append(_main_row(r["task"], r["case"], r["seen"], "PSNR dB", r["methods"]["ours"]["psnr"],
                               others, digits=2, auto=auto))
    return lines


def k_slopes(results: dict) -> list[dict]:
    """Dice of the model at the smallest and the largest k per cross-subject set (the slope
    tells whether more examples help, which a domain-recogniser's flat curve does not)."""
    out = []
    rows = [r for r in results.get("cross_subject", {}).get("summary", []) if r["method"] in ("ours", CONTEXT_ONLY)]
    for name, method in dict.fromkeys((r["set"], r["method"]) for r in rows):
        by_k = {r["k"]: r["dice"] for r in rows if (r["set"], r["method"]) == (name, method)}
        lo, hi = min(by_k), max(by_k)
        out.append({"set": name, "method": method, "k_low": lo, "k_high": hi, "dice_low": by_k[lo],
                    "dice_high": by_k[hi], "gain": by_k[hi] - by_k[lo], "curve": by_k})
    return out


def in_context_section(results: dict) -> list[str]:
    """Dice against k, the ambiguity test and the shuffled-examples control."""
    lines = ["## Does the model read its examples?", "",
             "A model that only recognises the domain gives a flat Dice-vs-k curve, the same output "
             "whatever target its examples show, and nearly the same Dice with another task's examples.", ""]
    slopes = k_slopes(results)
    if slopes:
        lines += ["| cross-subject set | model | Dice by k | gain from fewest to most examples |", "|---|---|---|---|"]
        lines += [f"| {s['set']} | {s['method']} | " + " · ".join(f"k={k} {v:.3f}" for k, v in sorted(s["curve"].items()))
                  + f" | {s['gain']:+.3f} |" for s in slopes] + [""]
    ic = results.get("in_context", {})
    if ic.get("rows"):
        auto = "auto_follows_fraction" in ic["summary"]
        lines += ["Ambiguity test: the same query slices, examples of different targets on the same example "
                  "slices (slice by slice, no propagation). *Follows* = the output is closer to its own "
                  "target than to every other target. Shuffled = the example pairs of another case. "
                  "*Model*: the network alone; *auto*: what a run gives, the self-check's choice per target "
                  "between the model and the pixel classifier (leave-one-out over the example pairs).", "",
                  "| case | seen | k | queries × targets | Dice own target | Dice best other target | follows | Dice with shuffled examples |"
                  + (" auto: Dice own | auto: follows | auto: shuffled | auto chose |" if auto else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if auto else "")]
        for r in ic["rows"]:
            lines.append(f"| {r['case']} | {r['seen']} | {r['k']} | {r['n']} | {r['dice_own']:.3f} | "
                         f"{r['dice_best_other']:.3f} | {r['follows_fraction']:.0%} | {r['dice_shuffled']:.3f} |"
                         + (f" {r['auto_dice_own']:.3f} | {r['auto_follows_fraction']:.0%} | "
                            f"{r['auto_dice_shuffled']:.3f} | {', '.join(f'{t}: {m}' for t, m in r['auto_chosen'].items())} |"
                            if auto else ""))
        s = ic["summary"]
        lines += ["", f"Over all cases: the model's outputs follow their examples on {s['follows_fraction']:.1%} of "
                  f"queries; true examples score {s['dice_true_minus_shuffled']:+.3f} Dice above shuffled ones."
                  + (f" Auto's follow them on {s['auto_follows_fraction']:.1%} ({s['auto_dice_true_minus_shuffled']:+.3f} "
                     "above shuffled)." if auto else "")
                  + " All these images were seen in training (their labels too): a held-out multi-label "
                  "volume would be the cleaner test.", ""]
    return lines


CARD_BEGIN = "<!-- medgen bench: tables begin (written by `medgen bench --card`) -->"
CARD_END = "<!-- medgen bench: tables end -->"


def write_card_tables(card: Path, results: dict, ablations: dict[str, dict]) -> Path:
    """Put the bench's summary (and the ablation table) into a model card, replacing the previous
    bench tables; the rest of the card is kept. The card and BENCHMARKS.md thus come from one run."""
    meta = results["meta"]
    lines = [CARD_BEGIN, "", f"From `medgen bench` ({meta.get('date_utc', '')}, {meta.get('cpu', '')}, "
             f"model sha256 {str(meta.get('model_sha256', ''))[:8]}); rows marked seen = no are held out.", "",
             *main_table(results), "", *in_context_section(results)]
    if ablations:
        lines += ["", "Ablations (same benchmark rows, model figure only):", "", *ablation_table(results, ablations)]
    lines += ["", CARD_END]
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    block = "\n".join(lines)
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        text = head + block + rest.split(CARD_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Benchmark tables\n\n" + block + "\n"
    card.write_text(text, encoding="utf-8")
    return card


def ablation_table(results: dict, ablations: dict[str, dict]) -> list[str]:
    """The model's figure per main-table row, for the main model and each ablation run."""
    def ours(res: dict) -> dict[str, str]:
        rows = [line.split(" | ") for line in main_table(res)[2:]]
        return {f"{r[0].lstrip('| ')} · {r[1]}": r[4].strip("* ") for r in rows}
    base = ours(results)
    others = {name: ours(res) for name, res in ablations.items()}
    lines = ["| benchmark | this model | " + " | ".join(others) + " |", "|---|---|" + "---|" * len(others)]
    for key, value in base.items():
        lines.append(f"| {key} | {value} | " + " | ".join(o.get(key, "–") for o in others.values()) + " |")
    return lines


def _structures(r: dict) -> str:
    names = r["structures"]
    shown = ", ".join(names[:4]) + (f", … ({len(names)} in all)" if len(names) > 4 else "")
    return f"{shown} (n={r['n']})"


def _main_row(bench: str, data: str, seen: str, metric: str, ours: float,
              others: list[tuple[str, float]], digits: int = 3, auto: float | None = None) -> str:
    best_name, best = max(others, key=lambda o: o[1])
    every = " · ".join(f"{n} {v:.{digits}f}" for n, v in others)
    single = max(best, ours)
    tail = "– | – |" if auto is None else f"{auto:.{digits}f} | {auto - single:+.{digits}f} |"
    return (f"| {bench} | {data} | {seen} | {metric} | **{ours:.{digits}f}** | {best:.{digits}f} ({best_name}) "
            f"| {ours - best:+.{digits}f} | {every} | {tail}")


def _propagation_section(p: dict, images: dict) -> list[str]:
    scored = [r for r in p["rows"] if "methods" in r]
    methods = ["ours", *(["auto"] if scored and "auto" in scored[0]["methods"] else []), *PROPAGATION_BASELINES]
    lines = ["## 1. In-volume propagation", "",
             "Mean over structures; cells are Dice / HD95 (mm) / Dice between the outermost given slices.", "",
             "| seen | k | n | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    by = {(r["seen"], r["k"], r["method"]): r for r in p["summary"]}
    for seen, k in dict.fromkeys((r["seen"], r["k"]) for r in p["summary"]):
        cells = [by[(seen, k, m)] for m in methods if (seen, k, m) in by]
        lines.append(f"| {seen} | {k} | {cells[0]['n']} | " + " | ".join(
            f"{c['dice']:.3f} / {c['hd95']:.1f} / {_fmt(c['dice_between'])}" for c in cells) + " |")
    lines += ["", f"![Dice vs k]({images.get('propagation_dice', '')})", "",
              "Per structure (Dice of the slices not given; HD95 in mm; empty = no voxel predicted, "
              "HD95 then set to the scored volume's diagonal):", "",
              "| structure | seen | labels by | k | given slices | " + " | ".join(methods) + " |",
              "|---|---|---|---|---|" + "---|" * len(methods)]
    for r in p["rows"]:
        if "methods" not in r:
            lines.append(f"| {r['structure']} | {r['seen']} | | {r['k']} | skipped: {r['skipped']} |" + " |" * len(methods))
            continue
        cells = [f"{r['methods'][m]['dice']:.3f} / {r['methods'][m]['hd95']:.1f}"
                 + (" (empty)" if r["methods"][m]["empty"] else "") for m in methods]
        lines.append(f"| {r['structure']} | {r['seen']} | {r['labels_by']} | {r['k']} | "
                     f"{','.join(map(str, r['given']))} | " + " | ".join(cells) + " |")
    if "propagation_montage" in images:
        lines += ["", f"![best and worst propagation]({images['propagation_montage']})", ""]
    return lines + [""] + self_check_section(p["rows"])


def one_slice_rule(rows: list[dict]) -> list[str]:
    """k = 1: the model (the rule) against registration as auto would run it, on the same rows."""
    one = [r for r in rows if r["k"] == 1 and "one_slice_registration" in r]
    if not one:
        return []
    lines = ["", "With one labelled slice nothing can be held out and the rule (`selfcheck.K1_RULE`) runs the model. "
             "Its competitor there is registration as auto would run it, its open ends stopped as the model's are, "
             "not the plain baseline above, which runs to the volume's edges (on structures the bench does not "
             "score: `python -m medgen_dev.bench.k1`):", "",
             "| seen | n | model | registration as auto runs it | rows model ahead by > 0.01 | "
             "rows registration ahead by > 0.01 |", "|---|---|---|---|---|---|"]
    for seen in dict.fromkeys(r["seen"] for r in one):
        model = np.array([r["methods"]["ours"]["dice"] for r in one if r["seen"] == seen])
        reg = np.array([r["one_slice_registration"] for r in one if r["seen"] == seen])
        lines.append(f"| {seen} | {len(model)} | {model.mean():.3f} | {reg.mean():.3f} | "
                     f"{int(np.sum(model > reg + 0.01))} | {int(np.sum(reg > model + 0.01))} |")
    return lines


def self_check_section(rows: list[dict]) -> list[str]:
    """Auto against every single method, the estimate's calibration and the self-check's cost."""
    rows = [r for r in rows if "methods" in r and "auto" in r]
    if not rows:
        return []
    singles = [m for m in rows[0]["methods"] if m != "auto"]
    lines = ["### Self-check: auto against the best single method", "",
             "`auto` (the default method) hides labelled slices in turn, scores the model, fill between "
             "slices, registration and nearest copy on them, and runs the best (between and beyond "
             "the labelled slices separately; `medgen/infer/selfcheck.py`). Its registration and nearest copy "
             "stop their open ends as the model does (one equivalent radius past the outermost labelled slice, "
             "sooner where the labelled slices' area profile closes; registration also where the tissue "
             "under the mask changes), unlike the plain baselines in the columns beside it. Dice of the slices not given.", "",
             "| seen | k | n | auto | best single on the mean | auto − best | worst row: auto − best on that row |",
             "|---|---|---|---|---|---|---|"]
    for seen, k in dict.fromkeys((r["seen"], r["k"]) for r in rows):
        group = [r for r in rows if r["seen"] == seen and r["k"] == k]
        mean = {m: float(np.mean([r["methods"][m]["dice"] for r in group])) for m in singles + ["auto"]}
        best = max(singles, key=mean.get)
        worst = min(group, key=lambda r: r["methods"]["auto"]["dice"] - max(r["methods"][m]["dice"] for m in singles))
        gap = worst["methods"]["auto"]["dice"] - max(worst["methods"][m]["dice"] for m in singles)
        lines.append(f"| {seen} | {k} | {len(group)} | {mean['auto']:.3f} | {mean[best]:.3f} ({best}) | "
                     f"{mean['auto'] - mean[best]:+.3f} | {gap:+.3f} ({worst['structure']}) |")
    lines += one_slice_rule(rows)
    lines += ["", "Per row: the method auto chose, its estimated Dice (the chosen method's leave-one-out Dice "
              "mapped by `selfcheck.expected_dice`, fitted on other structures: `medgen_dev.bench.calibrate`), "
              "and the Dice it got (k = 1 has nothing to hold out: no estimate, the bench's k = 1 rule picks "
              "the model).", "",
              "| structure | seen | k | chosen | estimated Dice | leave-one-out Dice | actual Dice | "
              "candidates (leave-one-out Dice) | run s (model) | run s (auto) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["auto"]
        cands = " · ".join(f"{m} {v:.2f}" for m, v in a["candidates"].items()) or "–"
        lines.append(f"| {r['structure']} | {r['seen']} | {r['k']} | {a['chosen']} | {_fmt(a['estimate'], 2)} | "
                     f"{_fmt(a.get('loo'), 2)} | {r['methods']['auto']['dice']:.3f} | {cands} | {r['seconds_ours']:.1f} | {a['seconds']:.1f} |")
    cal, raw = calibration(rows), calibration(rows, "loo")
    lines += ["", "### Calibration: estimated against actual Dice", ""]
    if cal["n"]:
        lines += ["| estimate | rows | mean absolute error | mean (estimate − actual) | Pearson r |",
                  "|---|---|---|---|---|",
                  f"| estimated Dice (reported) | {cal['n']} | {cal['mae']:.3f} | {cal['bias']:+.3f} | "
                  f"{_fmt(cal['r'], 2)} |"]
        if raw["n"]:
            lines.append(f"| leave-one-out Dice (before the map) | {raw['n']} | {raw['mae']:.3f} | "
                         f"{raw['bias']:+.3f} | {_fmt(raw['r'], 2)} |")
        lines.append("")
    else:
        lines += ["No row had k ≥ 2 labelled slices: nothing to calibrate.", ""]
    ratio = [r["auto"]["seconds"] / max(r["seconds_ours"], 1e-6) for r in rows]
    lines += [f"Cost: auto took {np.median(ratio):.1f}x the model-only run's time (median over rows; "
              f"range {min(ratio):.1f}x–{max(ratio):.1f}x; the model-only time counts its own run, auto's counts "
              "the self-check and the chosen methods' run).", ""]
    return lines


def calibration(rows: list[dict], key: str = "estimate") -> dict:
    """Estimated (`key`: the reported estimate, or "loo" the leave-one-out Dice before the map)
    against actual Dice of auto over the rows that have one."""
    pairs = [(r["auto"][key], r["methods"]["auto"]["dice"]) for r in rows
             if r.get("auto", {}).get(key) is not None]
    if not pairs:
        return {"n": 0}
    est, act = np.array(pairs).T
    r = float(np.corrcoef(est, act)[0, 1]) if len(pairs) > 2 and est.std() > 0 and act.std() > 0 else None
    return {"n": len(pairs), "mae": float(np.mean(np.abs(est - act))), "bias": float(np.mean(est - act)), "r": r}


def _cross_section(c: dict, images: dict) -> list[str]:
    methods = ["ours", CONTEXT_ONLY, *CROSS_BASELINES]
    lines = ["## 2. Cross-subject 2D segmentation", "",
             "Mean Dice ± SD over queries. *ours* is the default run: the network reads the examples "
             "as context and is fine-tuned on them (pipeline.CROSS_SUBJECT_ADAPT_STEPS); *context only* "
             "is the same network without the fine-tuning. For scale only (different tasks and data, not comparable "
             "row by row): UniverSeg reports about 0.66 Dice with 8 and 0.70 with 16 examples on its "
             "held-out tasks.", "",
             "| set | queries seen | examples seen | k | n | " + " | ".join(methods) + " |",
             "|---|---|---|---|---|" + "---|" * len(methods)]
    by = {(r["set"], r["k"], r["method"]): r for r in c["summary"]}
    for name, k in dict.fromkeys((r["set"], r["k"]) for r in c["summary"]):
        first = by[(name, k, "ours")]
        lines.append(f"| {name} | {first['seen_queries']} | {first['seen_examples']} | {k} | {first['n']} | "
                     + " | ".join(f"{by[(name, k, m)]['dice']:.3f} ± {by[(name, k, m)]['dice_sd']:.3f}"
                                  for m in methods if (name, k, m) in by) + " |")
    lines += ["", f"![Dice vs k]({images.get('cross_dice', '')})", ""]
    return lines


def _image_section(t: dict, images: dict) -> list[str]:
    lines = ["## 3. Denoising, inpainting, synthesis", "",
             "| case | task | seen | scored slices | method | PSNR (dB) | SSIM |", "|---|---|---|---|---|---|---|"]
    for r in t["rows"]:
        for i, (m, v) in enumerate(r["methods"].items()):
            head = f"| {r['case']} | {r['task']} | {r['seen']} | {len(r['scored_slices'])} " if i == 0 else "| | | | "
            lines.append(f"{head}| {m} | {v['psnr']:.2f} | {v['ssim']:.3f} |")
    if "image_montage" in images:
        lines += ["", f"![image tasks]({images['image_montage']})", ""]
    return lines + [""]


def _speed_section(s: dict, images: dict) -> list[str]:
    lines = ["## 4. Speed and memory", "",
             f"Parameters: ours {s['ours_parameters'] / 1e6:.2f} M, UniverSeg-sized reference "
             f"{s['reference_parameters'] / 1e6:.2f} M (random weights).", "",
             f"| k | ours: GFLOPs per query slice ({s['flops_size']}²) | ours: GFLOPs to encode the k pairs (once per run) "
             "| reference: GFLOPs per query slice (128²) |", "|---|---|---|---|"]
    for f in s["flops"]:
        lines.append(f"| {f['k']} | {f['ours_query_gflops']:.2f} | {f['ours_context_gflops']:.2f} | "
                     f"{f['reference_query_gflops']:.2f} |")
    lines += ["", "Our network runs its own path here (method \"model\", no self-check), to compare the two "
              "networks; the self-check's cost is in the next table. "
              "Peak RSS is the whole child process; \"before\" is its resident memory after loading "
              "the libraries, the network and the volume, just before the timed run.", "",
              "| network | task | device | volume (z, y, x) | k | seconds | s per slice | peak RSS (MB) | RSS before (MB) | peak GPU (MB) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for v in s["volumes"]:
        name = "ours" if v["net"] == "medgen" else "UniverSeg-sized reference"
        flag = f" (timed {v['slices_timed']} slices, extrapolated)" if v["extrapolated"] else ""
        gpu = "–" if v.get("peak_gpu_mb") is None else f"{v['peak_gpu_mb']:.0f}"
        lines.append(f"| {name} | {v['task']} | {v['device']} | {tuple(v['shape'])} | {v['k']} | "
                     f"{v['seconds']:.1f}{flag} | {v['seconds_per_slice']:.3f} | {v['peak_rss_mb']:.0f} | "
                     f"{v.get('base_rss_mb', float('nan')):.0f} | {gpu} |")
    lines += ["", _ratio_line(s), "", f"![time vs volume size]({images.get('speed_time', '')})", ""]
    return lines + _user_runs_table(s.get("user_runs", []))


def _user_runs_table(runs: list[dict]) -> list[str]:
    """`medgen run` as users meet it (python -m medgen_dev.bench.stages): a fresh process reading
    and writing real files, so imports, model load and I/O count; "warm" repeats the engine in
    the same process (Slicer's worker, `medgen batch`). Method "auto" includes the self-check."""
    if not runs:
        return []
    lines = ["### As users run it", "",
             "A fresh process per row (`python -m medgen_dev.bench.stages --shape ... --method ...`): "
             "imports, reading, model load, the engine and writing, on the shipped MNI152 sample "
             "resampled to the size, 8 labelled slices (or 8 example pairs for denoising) over the "
             "middle 80 %. Cold = the whole process including interpreter start; warm = the engine "
             "again in the same process (as in Slicer's worker or `medgen batch`).", "",
             "| task | volume (z, y, x) | labels | method | cold wall (s) | imports + reading (s) | engine (s) "
             "| warm engine (s) | peak RSS (MB) | what ran |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        st = r["stages"]
        engine = sum(st[k] for k in ("interpolation", "model", "crops/resampling", "engine other"))
        warm = "–" if r.get("warm_engine") is None else f"{r['warm_engine']:.1f}"
        lines.append(f"| {r['task']} | {tuple(r['shape'])} | {r['labels']} | {r['method']} | {r['cold_wall']:.1f} | "
                     f"{st['imports'] + st['reading']:.1f} | {engine:.1f} | {warm} | {r['peak_rss_mb']:.0f} | "
                     f"{'; '.join(r['chosen'])} |")
    return lines + [""]


def _ratio_line(s: dict) -> str:
    """Reference seconds / ours for each (device, shape, k) where both segmented."""
    ours = {(v["device"], tuple(v["shape"]), v["k"]): v["seconds"] for v in s["volumes"]
            if v["net"] == "medgen" and v["task"] == "segment"}
    ratios = [f"{tuple(v['shape'])} k={v['k']}: {v['seconds'] / ours[key]:.1f}x"
              for v in s["volumes"] if v["net"] == "universeg"
              and (key := (v["device"], tuple(v["shape"]), v["k"])) in ours]
    return "Reference time / our time (segmentation, same volume, same k): " + ("; ".join(ratios) or "–") + "."


# -- plots and montages ----------------------------------------------------------------------------
def draw_all(results: dict, pictures: dict, figs: Path) -> dict[str, str]:
    """Every PNG the report links, as {key: path relative to the report}."""
    import matplotlib
    matplotlib.use("Agg")
    out: dict[str, str] = {}
    # no montage of the cross-subject sets: BUSI and DRIVE have no open licence, so pictures of
    # their images must not be committed with the report (plots of numbers are fine)
    jobs = {"propagation_dice": ("propagation", _plot_propagation),
            "propagation_montage": ("propagation", _montage_propagation),
            "cross_dice": ("cross_subject", _plot_cross),
            "image_montage": ("image_tasks", _montage_images),
            "speed_time": ("speed", _plot_speed)}
    for key, (section, fn) in jobs.items():
        if section in results and fn(results[section], pictures.get(section, {}), figs / f"{key}.png"):
            out[key] = f"bench/{key}.png"
    return out


def _save(fig, path: Path) -> bool:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _dice_vs_k(ax, rows: list[dict]) -> None:
    """One line per method (ours drawn thicker): mean Dice against k."""
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["k"], r["dice"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", lw=2.5 if method == "ours" else 1.2, label=method)


def _plot_propagation(p: dict, _pics: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt
    groups = [g for g in ("no", "yes", "unknown") if any(r["seen"] == g for r in p["summary"])]
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, g in zip(axes[0], groups):
        rows = [r for r in p["summary"] if r["seen"] == g]
        _dice_vs_k(ax, rows)
        ax.set(xlabel="labelled slices k", ylabel="mean Dice", ylim=(0, 1),
               title={"no": "held out from training", "yes": "seen in training"}.get(g, "seen: unknown"))
        ax.set_xticks(sorted({r["k"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _plot_cross(c: dict, _pics: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt
    sets = list(dict.fromkeys(r["set"] for r in c["summary"]))
    if not sets:
        return False
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        rows = [r for r in c["summary"] if r["set"] == name]
        _dice_vs_k(ax, rows)
        ax.set(xlabel="examples k", ylabel="mean Dice", ylim=(0, 1), xscale="log", title=name)
        ax.set_xticks(sorted({r["k"] for r in rows}), [str(k) for k in sorted({r["k"] for r in rows})])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _plot_speed(s: dict, _pics: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt
    runs = [v for v in s["volumes"] if v["task"] == "segment"]
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys((v["net"], v["k"], v["device"]) for v in runs):
        pts = sorted((float(np.prod(v["shape"])), v["seconds"]) for v in runs
                     if (v["net"], v["k"], v["device"]) == key)
        name = "ours" if key[0] == "medgen" else "UniverSeg-sized"
        ax.plot(*zip(*pts), marker="o" if key[0] == "medgen" else "s",
                ls="-" if key[0] == "medgen" else "--", label=f"{name}, k={key[1]}, {key[2]}")
    ax.set(xscale="log", yscale="log", xlabel="voxels in the volume", ylabel="seconds (segmentation)",
           title="whole-volume time")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _overlay(ax, image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray | None, title: str) -> None:
    ax.imshow(image, cmap="gray")
    if pred is not None:
        ax.imshow(np.ma.masked_where(~pred, pred), cmap="autumn", alpha=0.45, interpolation="nearest")
    if truth is not None and truth.any():
        ax.contour(truth, levels=[0.5], colors="lime", linewidths=0.8)
    ax.set_title(title, fontsize=6)
    ax.axis("off")


def _best_worst(scores: dict) -> list:
    keys = sorted(scores, key=scores.get)
    return [keys[-1], keys[0]] if len(keys) > 1 else keys


def _montage_propagation(p: dict, pics: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt
    top = {}
    for r in p["rows"]:
        if "methods" in r and (r["structure"], r["k"]) in pics:
            top[r["structure"]] = r  # the largest k (rows come in increasing k)
    scores = {(r["structure"], r["k"]): r["methods"]["ours"]["dice"] for r in top.values()}
    if not scores:
        return False
    picks = _best_worst(scores)
    methods = list(next(iter(top.values()))["methods"])
    fig, axes = plt.subplots(len(picks), len(methods), figsize=(2.6 * len(methods), 3.2 * len(picks)), squeeze=False)
    for row, key in zip(axes, picks):
        pic = pics[key]
        r = top[key[0]]
        for ax, m in zip(row, methods):
            _overlay(ax, pic["image"], pic["truth"], pic["preds"][m],
                     f"{key[0]} k={key[1]} slice {pic['slice']}\n{m}: Dice {r['methods'][m]['dice']:.2f}")
    fig.suptitle("best and worst structure for the model: the scored slice with the most structure; Dice is over "
                 "all scored slices (green: reference outline, orange: prediction)", fontsize=8)
    return _save(fig, path)


def _montage_images(t: dict, pics: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt
    cases = [r for r in t["rows"] if r["case"] in pics]
    if not cases:
        return False
    cols = 1 + max(len(pics[r["case"]]["preds"]) for r in cases)
    fig, axes = plt.subplots(len(cases), cols, figsize=(2.4 * cols, 2.5 * len(cases)), squeeze=False)
    for row, r in zip(axes, cases):
        pic = pics[r["case"]]
        ref = pic["reference"]
        lo, hi = np.percentile(ref[pic["region"]] if pic["region"].any() else ref, (1, 99))
        panels = [("reference", ref, None)] + [(m, p, r["methods"][m]) for m, p in pic["preds"].items()]
        for ax in row:
            ax.axis("off")
        for ax, (name, img, v) in zip(row, panels):
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            if name == "reference" and r["task"] == "inpaint":
                ax.contour(pic["region"], levels=[0.5], colors="lime", linewidths=0.6)
            label = name + (f"\n{v['psnr']:.2f} dB, SSIM {v['ssim']:.3f}" if v else
                            f" (slice {pic['slice']})\n{r['case'][:48]}")
            ax.set_title(label, fontsize=6)
    return _save(fig, path)
