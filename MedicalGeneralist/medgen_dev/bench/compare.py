"""Rank checkpoints on the bench's rows, model only: `python -m medgen_dev.bench.compare NAME=MODEL ...`.

Training runs (ablations, continued runs) need a verdict in minutes, not the full bench's hour:
this scores only the model column (no self-check, no baselines, which do not change between
checkpoints) on every propagation structure (k = 1, 3, 5), the held-out BUSI set (k = 1, 4, 8, 16),
the in-context section (ambiguity, shuffled examples) and the image tasks, and prints one Markdown
table with a column per model. The figures are the bench's own (same rows, slices, seeds), so a
checkpoint that wins here is worth a full `medgen bench`; they are not a substitute for it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from medgen_dev.bench.data import BenchConfig, load_config, load_structure, spread_slices
from medgen_dev.bench.runner import _load_pair, image_tasks, in_context
from medgen.metrics import seg_scores
from medgen.prompts import pairs_from_volumes


def propagation_model(model, cfg: BenchConfig, device: str) -> dict[str, float]:
    """Mean Dice of the model's propagation on the slices not given, per (seen, k)."""
    from medgen.infer.pipeline import RunOptions, run

    scores: dict[str, list[float]] = {}
    for s in cfg.structures:
        image, label, axis = load_structure(s)
        truth = np.moveaxis(label.array, axis, 0) > 0
        present = np.nonzero(truth.any((1, 2)))[0]
        for k in cfg.propagation_k:
            if k >= len(present):
                continue
            given = spread_slices(present, k, np.random.default_rng([cfg.seed, k]))
            examples = pairs_from_volumes(image, label, axis, given, "segment", s.modality, own=True)
            out = run(model, image, examples, RunOptions("segment", axis, s.modality, device, method="model"))
            pred = np.moveaxis(out.array, axis, 0) > 0
            rest = np.setdiff1d(np.arange(truth.shape[0]), given)
            scores.setdefault(f"propagation, seen={s.seen}, k={k}", []).append(
                seg_scores(pred[rest], truth[rest], with_hd95=False)["dice"])
    return {name: float(np.mean(v)) for name, v in sorted(scores.items())}


def cross_subject_model(model, cfg: BenchConfig, device: str) -> dict[str, float]:
    """Mean Dice per k on the first pair set (the held-out BUSI clusters), the bench's example draws."""
    from medgen.infer.pipeline import RunOptions, run

    ps, ks = cfg.pair_sets[0], sorted(cfg.cross_k)
    dices: dict[int, list[float]] = {k: [] for k in ks}
    for qi, query in enumerate(ps.queries[:cfg.queries_per_set]):
        pool = [p for p in ps.pool if p[0] != query[0]] if ps.leave_one_out else list(ps.pool)
        order = np.random.default_rng([cfg.seed, qi]).permutation(len(pool))[:ks[-1]]
        examples = [_load_pair(pool[int(i)]) for i in order]
        image, truth = _load_pair(query)
        for k in ks:
            ex = []
            for img, msk in examples[:k]:
                ex += pairs_from_volumes(img, img.with_array(msk.astype(np.uint8)), 0, None, "segment",
                                         ps.modality, own=False)
            pred = run(model, image, ex, RunOptions("segment", 0, ps.modality, device, method="model")).array[0] > 0
            dices[k].append(seg_scores(pred, truth[0], with_hd95=False)["dice"])
    return {f"{ps.name}, k={k}": float(np.mean(v)) for k, v in dices.items()}


def figures(spec: str, cfg: BenchConfig, device: str) -> dict[str, float]:
    """Every figure of one model, keyed by row name."""
    from medgen.io.weights import load_model

    model, _ = load_model(spec, device="cpu")
    quiet = lambda message: None
    out = {**propagation_model(model, cfg, device), **cross_subject_model(model, cfg, device)}
    ctx = in_context(model, cfg, device, quiet)["summary"]
    out["ambiguity: outputs that follow their own examples"] = ctx["follows_fraction"]
    out["ambiguity: Dice true minus shuffled examples"] = ctx["dice_true_minus_shuffled"]
    for row in image_tasks(model, cfg, device, quiet)[0]["rows"]:
        out[f"{row['task']} {row['case']}, PSNR dB"] = row["methods"]["ours"]["psnr"]
    return out


def table(results: dict[str, dict[str, float]]) -> list[str]:
    names = list(results)
    rows = list(dict.fromkeys(r for res in results.values() for r in res))
    lines = ["| row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        digits = 2 if "PSNR" in r else 3
        lines.append(f"| {r} | " + " | ".join(f"{results[n][r]:.{digits}f}" if r in results[n] else "–"
                                               for n in names) + " |")
    return lines


def plot_runs(runs: dict[str, Path], png: Path) -> Path:
    """Training runs side by side (smoothed segmentation / image losses, held-out validation), for
    run folders that hold the trainer's log.csv and val.csv."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medgen_dev.train.trainer import _smooth

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for name, folder in runs.items():
        rows = list(csv.reader((folder / "log.csv").open()))
        step = np.asarray([float(r[0]) for r in rows])
        for ax, col, what in ((axes[0], 4, "segmentation loss"), (axes[1], 5, "image-task loss")):
            vals = np.asarray([float(r[col]) if r[col] else np.nan for r in rows])
            ok = ~np.isnan(vals)
            ax.plot(step[ok], _smooth(vals[ok], 50), label=name)
            ax.set(xlabel="step", title=f"{what} (smoothed)")
        val = list(csv.DictReader((folder / "val.csv").open())) if (folder / "val.csv").exists() else []
        vs = [float(r["step"]) for r in val]
        axes[2].plot(vs, [float(r["seg_dice"] or "nan") for r in val], "o-", label=name)
        axes[3].plot(vs, [float(r["image_psnr"] or "nan") for r in val], "s-", label=name)
    axes[2].set(xlabel="step", title="held-out validation Dice")
    axes[3].set(xlabel="step", title="held-out validation PSNR (dB)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=72)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medgen_dev.bench.compare", description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", metavar="NAME=MODEL", help="model id, folder or safetensors file")
    ap.add_argument("--queries", type=int, default=20, help="BUSI queries (the full bench uses 40)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="", help="also write the figures here")
    ap.add_argument("--curves", default="", metavar="PNG", help="also draw the training curves of the models "
                    "that are run folders (log.csv) side by side")
    args = ap.parse_args(argv)
    if args.curves:
        runs = {n: Path(s) for n, _, s in (m.partition("=") for m in args.models) if (Path(s) / "log.csv").is_file()}
        print(f"curves: {plot_runs(runs, Path(args.curves))}")
    cfg = replace(load_config(), cross_k=[1, 4, 8, 16], queries_per_set=args.queries)
    results = {}
    for item in args.models:
        name, _, spec = item.partition("=")
        t = time.perf_counter()
        results[name] = figures(spec or name, cfg, args.device)
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
