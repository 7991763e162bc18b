"""The denoising start's NL-means search window against the model's result, on the bench's
denoising cases (python -m medgen_dev.bench.denoise_start [--quick] [--distances 6,4,3]).

For each case and window the bench's own denoising row is recomputed (same noise, slices and
scoring); the table gives the model's PSNR and the seconds of the classical start per slice.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from medgen.infer import imagetasks
    from medgen.io.weights import load_model
    from medgen_dev.bench import runner
    from medgen_dev.bench.data import load_config

    ap = argparse.ArgumentParser(prog="python -m medgen_dev.bench.denoise_start")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--distances", default="6,4,3")
    ap.add_argument("--case", default="", help="only cases whose name contains this")
    args = ap.parse_args(argv)
    cfg = load_config(None, args.quick)
    model = load_model(None)[0]
    cases = [c for c in cfg.image_cases if c.task == "denoise" and args.case in c.name]
    timed = imagetasks.classical_denoise
    print("| case | search window | PSNR ours (dB) | NL-means start s/slice |\n|---|---|---|---|")
    for case in cases:
        for d in (int(v) for v in args.distances.split(",")):
            imagetasks.NLM_DISTANCE = d
            spent = []

            def start(x, timed=timed, spent=spent):
                t = time.perf_counter()
                out = timed(x)
                spent.append((time.perf_counter() - t) / len(x))
                return out
            imagetasks.classical_denoise = start
            row, _ = runner._denoise(model, case, cfg, "cpu")
            imagetasks.classical_denoise = timed
            print(f"| {case.name} | {2 * d + 1}x{2 * d + 1} | {row['methods']['ours']['psnr']:.2f} | "
                  f"{np.mean(spent):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
