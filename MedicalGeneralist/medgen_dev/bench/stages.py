"""Where a `medgen run` spends its time and memory, stage by stage, in a fresh process.

    python -m medgen_dev.bench.stages --shape 200x256x256 --labels 1 [--task segment] [--warm]

The volume is the bench speed section's (the shipped MNI152 sample resampled by SimpleITK to
the asked size, tissue labels as structures, 8 labelled slices over the middle 80 %), written to
a temporary folder so reading and writing are real file I/O. The child process runs what
`medgen run` runs (imports, reading, model load, the engine, writing) and times each stage;
inside the engine, time is attributed by wrapping the interpolation, the model calls and the
crop/resample helpers (so "engine other" is the rest: normalisation, blending, connectivity).
`--warm` repeats the engine in the same process (what Slicer and `medgen batch` pay per case).
Peak RSS is the child's own (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STAGES = ("imports", "reading", "model load", "interpolation", "model", "crops/resampling",
          "engine other", "writing")


def _wrap(module, name: str, bucket: dict, key: str) -> None:
    fn = getattr(module, name)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            bucket[key] += time.perf_counter() - t
    setattr(module, name, timed)


def child(folder: str, task: str, warm: bool, method: str = "auto", model_spec: str | None = None) -> dict:
    """The timed body of one `medgen run`-like process."""
    times = dict.fromkeys(STAGES, 0.0)
    t = time.perf_counter()
    from medgen.core.intensity import guess_modality
    from medgen.infer import imagetasks, interpolate, pipeline, predictor, segment
    from medgen.io.images import read_volume, write_volume
    from medgen.io.weights import load_model
    from medgen.prompts import examples_from_files, parse_slices
    times["imports"] = time.perf_counter() - t

    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    t = time.perf_counter()
    image = read_volume(str(folder / "image.nii.gz"))
    modality = guess_modality(image.array)
    if task == "segment":
        examples = examples_from_files("segment", image, [], [str(folder / "labels.nii.gz")],
                                       parse_slices(meta["slices"]), 0, modality)
    else:
        examples = examples_from_files(task, image, [str(folder / "noisy.nii.gz")], [str(folder / "image.nii.gz")],
                                       parse_slices(meta["slices"]), 0, modality)
        image = read_volume(str(folder / "noisy.nii.gz"))
    times["reading"] = time.perf_counter() - t
    t = time.perf_counter()
    model, _ = load_model(model_spec)
    times["model load"] = time.perf_counter() - t

    inner = dict.fromkeys(("interpolation", "model", "crops/resampling"), 0.0)
    _wrap(interpolate, "fill_between_slices", inner, "interpolation")
    for name in ("encode", "predict", "predict_tensor"):
        _wrap(predictor.Predictor, name, inner, "model")
    for mod in (segment, imagetasks):
        for name in ("to_grid", "from_grid", "crop"):
            if hasattr(mod, name):
                _wrap(mod, name, inner, "crops/resampling")
    _wrap(imagetasks, "_per_slice", inner, "interpolation")  # the classical denoising start
    runs = []
    for _ in range(2 if warm else 1):
        inner.update(dict.fromkeys(inner, 0.0))
        t = time.perf_counter()
        done = pipeline.run_with_report(model, image, examples, pipeline.RunOptions(task, 0, modality, method=method))
        engine = time.perf_counter() - t
        result = done.volume
        runs.append({"engine": engine, **inner})
    first = runs[0]
    times.update({k: first[k] for k in inner})
    times["engine other"] = first["engine"] - sum(first[k] for k in inner)
    t = time.perf_counter()
    write_volume(result, folder / "out.nii.gz")
    times["writing"] = time.perf_counter() - t
    out = {"stages": times, "runs": runs, "peak_rss_mb": _peak_mb(), "chosen": done.report.lines()}
    return out


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def prepare(folder: Path, shape: tuple[int, int, int], labels: int, task: str) -> None:
    """The bench's resampled MNI sample as files: image, labels (first `labels` values), noisy."""
    import SimpleITK as sitk

    from medgen_dev.bench.speed import resampled_sample

    img, lab = resampled_sample(shape)
    arr = sitk.GetArrayFromImage(lab)
    keep = sitk.GetImageFromArray(np.where((arr > 0) & (arr <= labels), arr, 0).astype(np.uint8))
    keep.CopyInformation(lab)
    sitk.WriteImage(img, str(folder / "image.nii.gz"))
    sitk.WriteImage(keep, str(folder / "labels.nii.gz"))
    if task != "segment":
        a = sitk.GetArrayFromImage(img)
        noisy = sitk.GetImageFromArray(a + np.random.default_rng(0).normal(0, 10, a.shape).astype(np.float32))
        noisy.CopyInformation(img)
        sitk.WriteImage(noisy, str(folder / "noisy.nii.gz"))
    n = shape[0]
    slices = sorted({int(round(v)) for v in np.linspace(n * 0.1, n * 0.9 - 1, 8)})
    (folder / "meta.json").write_text(json.dumps({"slices": ",".join(map(str, slices))}))


def measure(shape: tuple[int, int, int], labels: int = 1, task: str = "segment", warm: bool = False,
            method: str = "auto", model_spec: str | None = None) -> dict:
    """Run `child` in a fresh Python; "cold_wall" is the process wall less the warm repeat."""
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp), shape, labels, task)
        code = (f"import json; from medgen_dev.bench.stages import child; "
                f"print(json.dumps(child({tmp!r}, {task!r}, {warm}, {method!r}, {model_spec!r})))")
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE")))
        wall = time.perf_counter() - t
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["wall"] = wall
    r["cold_wall"] = wall - (r["runs"][1]["engine"] if len(r["runs"]) > 1 else 0.0)
    return r


def table(r: dict) -> str:
    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["stages"].items()]
    lines.append(f"| **process wall (cold, incl. interpreter start)** | {r['cold_wall']:.1f} |")
    if len(r["runs"]) > 1:
        lines.append(f"| warm second run (engine) | {r['runs'][1]['engine']:.1f} |")
    lines.append(f"| peak RSS (MB) | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines + [""] + r["chosen"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medgen_dev.bench.stages", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="200x256x256")
    ap.add_argument("--labels", type=int, default=1)
    ap.add_argument("--task", default="segment", choices=["segment", "denoise"])
    ap.add_argument("--warm", action="store_true")
    ap.add_argument("--method", default="auto", help="the run's method (auto = with the self-check)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    r = measure(shape, args.labels, args.task, args.warm, args.method)
    print(table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
