"""Fill between slices, backend against backend, on the bench's propagation structures.

    python -m medgen_dev.bench.interp [--quick] [--k 3,5,8] [--backends vtkitk,itk,distance]

For every structure and k the labelled slices are chosen as the propagation section chooses them
(`spread_slices`, seed [seed, k]); each backend fills between them and is scored (Dice) on the
slices strictly between the outermost labelled ones. Each backend runs in its own child process:
pip's itk and Slicer's vtkITK carry two ITK builds that must not share a process, and the cold
column (import + first call) is what a fresh `medgen run` pays.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def _cases(quick: bool, ks: list[int]):
    from medgen_dev.bench.data import load_config, load_structure, spread_slices

    cfg = load_config(None, quick)
    for s in cfg.structures:
        image, label, axis = load_structure(s)
        truth = np.moveaxis(label.array, axis, 0) > 0
        present = np.nonzero(truth.any((1, 2)))[0]
        for k in ks:
            if k >= len(present) or k < 2:
                continue
            given = spread_slices(present, k, np.random.default_rng([cfg.seed, k]))
            if len(given) >= 2:
                yield s.name, k, truth, given


def backend_rows(name: str, quick: bool, ks: list[int]) -> list[dict]:
    """Child-process body: one backend over every case (first row carries the cold cost)."""
    from medgen.infer import interpolate

    rows, start = [], time.perf_counter()
    interpolate.backend((name,))
    load = time.perf_counter() - start
    for structure, k, truth, given in _cases(quick, ks):
        t = time.perf_counter()
        pred = interpolate.fill_between_slices(truth, given, backend_name=name)
        seconds = time.perf_counter() - t
        inner = np.setdiff1d(np.arange(given[0] + 1, given[-1]), given)
        p, g = pred[inner], truth[inner]
        dice = 2 * float((p & g).sum()) / max(float(p.sum() + g.sum()), 1.0)
        rows.append({"structure": structure, "k": len(given), "dice": dice, "seconds": seconds,
                     "shape": list(truth.shape)})
    if rows:
        rows[0]["load"] = load
    return rows


def model_rows(names: list[str], quick: bool, ks: list[int], device: str = "cpu") -> list[dict]:
    """The model's propagation Dice (the bench's "ours") with each backend as its prior, on the
    quick bench's crops around every structure (so all of them fit in minutes on a CPU)."""
    from medgen.infer import interpolate
    from medgen.infer.pipeline import RunOptions, run
    from medgen.io.weights import load_model
    from medgen.prompts import pairs_from_volumes
    from medgen_dev.bench.data import crop_around, load_config, load_structure, spread_slices

    model = load_model(None)[0]
    cfg, rows = load_config(None, False), []
    for s in cfg.structures:
        image, label, axis = load_structure(s)
        image, label = crop_around(image, label, axis)
        truth = np.moveaxis(label.array, axis, 0) > 0
        present = np.nonzero(truth.any((1, 2)))[0]
        for k in ks:
            if k >= len(present):
                continue
            given = spread_slices(present, k, np.random.default_rng([cfg.seed, k]))
            rest = np.setdiff1d(np.arange(truth.shape[0]), given)
            examples = pairs_from_volumes(image, label, axis, given, "segment", s.modality, own=True)
            row = {"structure": s.name, "k": len(given)}
            for name in names:
                interpolate.PREFERENCE = (name,)
                t = time.perf_counter()
                pred = np.moveaxis(run(model, image, examples, RunOptions("segment", axis, s.modality, device)).array,
                                   axis, 0)[rest] > 0
                row[f"s {name}"] = time.perf_counter() - t
                row[name] = 2 * float((pred & truth[rest]).sum()) / max(float(pred.sum() + truth[rest].sum()), 1.0)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medgen_dev.bench.interp", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", default="3,5,8")
    ap.add_argument("--backends", default="vtkitk,itk,distance")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--with-model", action="store_true",
                    help="score the model's propagation with each backend as its prior (itk, distance)")
    args = ap.parse_args(argv)
    ks = [int(v) for v in args.k.split(",")]
    if args.with_model:
        names = [n for n in args.backends.split(",") if n != "vtkitk"]
        rows = model_rows(names, args.quick, ks)
        print("| structure | k | " + " | ".join(f"Dice ours, {n} prior" for n in names) + " |")
        print("|---|---|" + "---|" * len(names))
        for r in rows:
            print(f"| {r['structure']} | {r['k']} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |")
        print("| **mean** | | " + " | ".join(f"{np.mean([r[n] for r in rows]):.3f}" for n in names) + " |")
        return 0
    if args.child:
        print(json.dumps(backend_rows(args.child, args.quick, ks)), flush=True)
        # slicer-core's vtkITK crashes when ITK's worker threads exit (thread-local filters of the
        # contour interpolator): the figures are out, skip the interpreter's teardown
        os._exit(0)
    table = {}
    for name in args.backends.split(","):
        cmd = [sys.executable, "-m", "medgen_dev.bench.interp", "--child", name, "--k", args.k] + (
            ["--quick"] if args.quick else [])
        table[name] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    names = list(table)
    print("| structure | k | " + " | ".join(f"Dice {n}" for n in names) + " | "
          + " | ".join(f"s {n}" for n in names) + " |")
    print("|---|---|" + "---|" * (2 * len(names)))
    for i, row in enumerate(table[names[0]]):
        print(f"| {row['structure']} | {row['k']} | " + " | ".join(f"{table[n][i]['dice']:.3f}" for n in names)
              + " | " + " | ".join(f"{table[n][i]['seconds']:.2f}" for n in names) + " |")
    print("| **mean** | | " + " | ".join(f"{np.mean([r['dice'] for r in table[n]]):.3f}" for n in names)
          + " | " + " | ".join(f"{np.sum([r['seconds'] for r in table[n]]):.1f} (sum)" for n in names) + " |")
    print("load (import) s: " + ", ".join(f"{n} {table[n][0].get('load', 0):.1f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
