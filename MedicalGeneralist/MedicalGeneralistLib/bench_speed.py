"""Speed and memory figures: FLOPs per query slice against k, and whole-volume seconds and peak RSS.

FLOPs are counted by torch's FlopCounterMode (convolutions and matrix products; the per-pair adds
of the interaction are memory-bound and not counted, their time is in the seconds column). Each
volume run happens in a fresh child process so its peak RSS is its own, not the benchmark's.
The volume is real: the shipped MNI152 sample resampled by SimpleITK to the asked size.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.flop_counter import FlopCounterMode

from .model import InContextUNet, count_parameters


def flops_per_slice(model: InContextUNet, k: int, size: int) -> tuple[float, float]:
    """(GFLOPs of one query slice given a cached context of k pairs, GFLOPs to encode the k pairs)."""
    ci = torch.rand(1, k, 1, size, size)
    ct = (torch.rand(1, k, 1, size, size) > 0.5).float()
    t, m = torch.tensor([0]), torch.tensor([1])
    with torch.inference_mode():
        with FlopCounterMode(display=False) as enc:
            cache = model.encode_context(ci, ct, t, m)
        with FlopCounterMode(display=False) as q:
            model.predict(torch.rand(1, 1, size, size), cache)
    return q.get_total_flops() / 1e9, enc.get_total_flops() / 1e9


def seconds_per_slice(model: InContextUNet, k: int, size: int, repeats: int = 10) -> float:
    ci, ct = torch.rand(1, k, 1, size, size), torch.rand(1, k, 1, size, size)
    with torch.inference_mode():
        cache = model.encode_context(ci, ct, torch.tensor([0]), torch.tensor([1]))
        q = torch.rand(1, 1, size, size)
        model.predict(q, cache)
        start = time.perf_counter()
        for _ in range(repeats):
            model.predict(q, cache)
    return (time.perf_counter() - start) / repeats


def resampled_sample(shape: tuple[int, int, int]) -> tuple[sitk.Image, sitk.Image]:
    """The shipped T1 and tissue labels resampled to shape (numpy order z, y, x)."""
    from .weights import resources_root
    root = resources_root() / "SampleData"
    t1 = sitk.ReadImage(str(root / "mni152_t1_2mm.nii.gz"), sitk.sitkFloat32)
    lab = sitk.ReadImage(str(root / "mni152_tissue_2mm.nii.gz"))
    size = shape[::-1]
    spacing = [sz * sp / n for sz, sp, n in zip(t1.GetSize(), t1.GetSpacing(), size)]
    args = (size, sitk.Transform(), None, t1.GetOrigin(), spacing, t1.GetDirection())
    img = sitk.Resample(t1, args[0], args[1], sitk.sitkLinear, *args[3:])
    labels = sitk.Resample(lab, args[0], args[1], sitk.sitkNearestNeighbor, *args[3:])
    return img, labels


def volume_run(task: str, shape: tuple[int, int, int], k: int, device: str) -> dict:
    """Child-process body: time one whole-volume run and report its peak RSS."""
    from .examples import pairs_from_volumes
    from .pipeline import RunOptions, run
    from .volume import Volume
    from .weights import load_model

    img, lab = resampled_sample(shape)
    vol = Volume(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    labels = vol.with_array(sitk.GetArrayFromImage(lab))
    n = shape[0]
    idx = [int(v) for v in np.linspace(n * 0.2, n * 0.8, k)]
    model, _ = load_model()
    start = time.perf_counter()
    if task == "segment":
        examples = pairs_from_volumes(vol, labels, 0, idx, "segment", "mr", own=True)
    else:
        noisy = vol.with_array(vol.array + np.random.default_rng(0).normal(0, 10, vol.shape).astype(np.float32))
        examples = pairs_from_volumes(noisy, vol, 0, idx, "denoise", "mr", own=False)
        vol = noisy
    run(model, vol, examples, RunOptions(task, 0, "mr", device))
    seconds = time.perf_counter() - start
    return {"task": task, "shape": list(shape), "k": k, "seconds": seconds,
            "seconds_per_slice": seconds / n,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_volume(task: str, shape: tuple[int, int, int], k: int, device: str = "auto") -> dict:
    code = ("import json,sys; from MedicalGeneralistLib.bench_speed import volume_run; "
            f"print(json.dumps(volume_run({task!r}, {tuple(shape)!r}, {k}, {device!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed_table(model: InContextUNet, volumes: list[tuple[int, int, int]], ks=(1, 8, 32),
                size: int = 192, device: str = "auto") -> str:
    """A Markdown table of the figures the README quotes."""
    lines = [f"model: {model.config.name}, {count_parameters(model) / 1e6:.2f} M parameters, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads", "",
             f"| k | GFLOPs per query slice ({size}²) | GFLOPs to encode the k pairs (once) | s per slice |",
             "|---|---|---|---|"]
    for k in ks:
        q, enc = flops_per_slice(model, k, size)
        lines.append(f"| {k} | {q:.2f} | {enc:.2f} | {seconds_per_slice(model, k, size):.3f} |")
    lines += ["", "| task | volume (z, y, x) | k | seconds | s per slice | peak RSS (MB) |",
              "|---|---|---|---|---|---|"]
    for shape in volumes:
        for task in ("segment", "denoise"):
            r = measure_volume(task, shape, 8, device)
            lines.append(f"| {task} | {shape} | 8 | {r['seconds']:.1f} | {r['seconds_per_slice']:.3f} | "
                         f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)
