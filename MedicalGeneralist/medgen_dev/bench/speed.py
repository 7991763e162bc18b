"""Speed and memory figures: FLOPs per slice against k, and whole-volume seconds and peak memory,
for this model and for a UniverSeg-sized reference network run through the same harness.

FLOPs are counted by torch's FlopCounterMode (convolutions and matrix products; the per-pair adds
of the interaction are memory-bound and not counted, their time is in the seconds column). Each
volume run happens in a fresh child process so its peak RSS is its own, not the benchmark's.
The volume is real: the shipped MNI152 sample resampled by SimpleITK to the asked size, with its
grey/white-matter labels as the structures (two labels, as a user would segment).

The reference network reproduces UniverSeg's architecture (Butoi et al. 2023: 4 encoder and 3
decoder CrossBlocks of 64 features, 1.18 M parameters, 128x128 inputs) with random weights: its
cost does not depend on the weights, and the ratio of the two is measured on one machine in one
run. Its defining cost is that every support pair meets the query through a 3x3 convolution at
every level, so nothing can be cached and k pairs cost about k network passes per slice.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medgen.nn.model import InContextUNet

UNIVERSEG_SIZE = 128


# -- the UniverSeg-sized reference ---------------------------------------------------------------
class CrossConv2d(nn.Conv2d):
    """A 3x3 convolution over every (query, support pair) concatenation, as UniverSeg's CrossConv2d."""

    def __init__(self, in_channels: tuple[int, int], out_channels: int) -> None:
        super().__init__(sum(in_channels), out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [B, Sx, Cx, H, W], y: [B, Sy, Cy, H, W] -> [B, Sx, Sy, C, H, W]."""
        b, sx, sy = x.shape[0], x.shape[1], y.shape[1]
        xy = torch.cat([x.unsqueeze(2).expand(-1, -1, sy, -1, -1, -1),
                        y.unsqueeze(1).expand(-1, sx, -1, -1, -1, -1)], dim=3)
        return super().forward(xy.flatten(0, 2)).unflatten(0, (b, sx, sy))


def _per_item(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to [B, S, C, H, W] by folding S into the batch."""
    return conv(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class CrossBlock(nn.Module):
    """Cross-convolution of query and every pair, mean over pairs for the query, convs on both."""

    def __init__(self, in_q: int, in_s: int, features: int) -> None:
        super().__init__()
        self.cross = CrossConv2d((in_q, in_s), features)
        self.target_conv = nn.Conv2d(features, features, 3, padding=1)
        self.support_conv = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, target: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inter = F.leaky_relu(self.cross(target, support)).squeeze(1)  # [B, S, C, H, W]
        target = F.leaky_relu(_per_item(self.target_conv, inter.mean(1, keepdim=True)))
        support = F.leaky_relu(_per_item(self.support_conv, inter))
        return target, support


class UniverSegReference(nn.Module):
    """UniverSeg's layout (encoder 4 x 64, decoder 3 x 64, skip connections on both streams)."""

    def __init__(self, features: int = 64, encoder: int = 4, decoder: int = 3) -> None:
        super().__init__()
        self.enc = nn.ModuleList(CrossBlock(1 if i == 0 else features, 2 if i == 0 else features, features)
                                 for i in range(encoder))
        self.dec = nn.ModuleList(CrossBlock(2 * features, 2 * features, features) for _ in range(decoder))
        self.out = nn.Conv2d(features, 1, 1)

    def forward(self, query: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """query [B, 1, H, W]; images, labels [B, S, 1, H, W] -> logits [B, 1, H, W]."""
        target, support = query[:, None], torch.cat([images, labels], 2)
        skips = []
        for i, block in enumerate(self.enc):
            target, support = block(target, support)
            if i < len(self.enc) - 1:
                skips.append((target, support))
                target, support = _pool(target), _pool(support)
        for block in self.dec:
            t_skip, s_skip = skips.pop()
            target = torch.cat([_up(target), t_skip], 2)
            support = torch.cat([_up(support), s_skip], 2)
            target, support = block(target, support)
        return self.out(target[:, 0])


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x.flatten(0, 1), 2).unflatten(0, x.shape[:2])


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x.flatten(0, 1), scale_factor=2, mode="bilinear",
                         align_corners=False).unflatten(0, x.shape[:2])


def universeg_reference(seed: int = 0) -> UniverSegReference:
    torch.manual_seed(seed)
    return UniverSegReference().eval()


# -- per-slice figures ----------------------------------------------------------------------------
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


def universeg_flops(net: UniverSegReference, k: int, size: int = UNIVERSEG_SIZE) -> float:
    """GFLOPs of one query slice with k support pairs (nothing to cache: all of it per slice)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(torch.rand(1, 1, size, size), torch.rand(1, k, 1, size, size), torch.rand(1, k, 1, size, size))
    return counter.get_total_flops() / 1e9


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


# -- whole volumes in a child process -----------------------------------------------------------
def resampled_sample(shape: tuple[int, int, int]) -> tuple[sitk.Image, sitk.Image]:
    """The shipped T1 and tissue labels resampled to shape (numpy order z, y, x)."""
    from medgen.io.weights import resources_root
    root = resources_root() / "SampleData"
    t1 = sitk.ReadImage(str(root / "mni152_t1_2mm.nii.gz"), sitk.sitkFloat32)
    lab = sitk.ReadImage(str(root / "mni152_tissue_2mm.nii.gz"))
    size = shape[::-1]
    spacing = [sz * sp / n for sz, sp, n in zip(t1.GetSize(), t1.GetSpacing(), size)]
    args = (size, sitk.Transform(), None, t1.GetOrigin(), spacing, t1.GetDirection())
    img = sitk.Resample(t1, args[0], args[1], sitk.sitkLinear, *args[3:])
    labels = sitk.Resample(lab, args[0], args[1], sitk.sitkNearestNeighbor, *args[3:])
    return img, labels


def volume_run(task: str, shape: tuple[int, int, int], k: int, device: str, net: str = "medgen",
               model: str | None = None, slab: int = 0) -> dict:
    """Child-process body: time one whole-volume run and report its peak memory.

    `slab` > 0 times only that many central slices and extrapolates to the volume, for runs whose
    cost is the same for every slice: the reference network and our denoising (examples still
    come from the whole volume). Propagation is never cut: its cost depends on the whole volume.
    The `extrapolated` flag travels with the figures."""
    from medgen.prompts import pairs_from_volumes
    from medgen.infer.pipeline import RunOptions, run
    from medgen.core.volume import Volume
    from medgen.io.weights import load_model

    img, lab = resampled_sample(shape)
    vol = Volume(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    labels = vol.with_array(sitk.GetArrayFromImage(lab))
    n = shape[0]
    idx = sorted({int(round(v)) for v in np.linspace(n * 0.1, n * 0.9 - 1, k)})
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    network = universeg_reference() if net == "universeg" else load_model(model)[0]
    base_mb = _current_rss_mb()  # libraries, the network and the input volume, before the run
    start = time.perf_counter()
    if net == "universeg":
        done = _universeg_volume(network, vol.array, labels.array, idx, device, slab)
    else:
        if task == "segment":
            examples = pairs_from_volumes(vol, labels, 0, idx, "segment", "mr", own=True)
        else:
            noisy = vol.with_array(vol.array + np.random.default_rng(0).normal(0, 10, vol.shape).astype(np.float32))
            examples = pairs_from_volumes(noisy, vol, 0, idx, "denoise", "mr", own=False)
            vol = _slab(noisy, slab)  # denoising is slice by slice: a slab costs its share
        # the network against the reference network: the model's own path, no self-check
        run(network, vol, examples, RunOptions(task, 0, "mr", device, method="model"))
        done = vol.shape[0]
    elapsed = time.perf_counter() - start
    seconds, per_slice = elapsed * n / done, elapsed / done  # linear: the reference network's slab
    if net != "universeg" and done < n:  # our slab: only its per-slice share, not the run's fixed cost
        per_slice = _warm_per_slice(network, noisy, examples, slab, device, task)
        seconds = elapsed + per_slice * (n - done)
    gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.device(device).type == "cuda" else None
    return {"net": net, "task": task, "shape": list(shape), "k": len(idx), "device": device,
            "seconds": seconds, "seconds_per_slice": per_slice,
            "slices_timed": done, "extrapolated": done < n, "peak_gpu_mb": gpu, "base_rss_mb": base_mb,
            "peak_rss_mb": _peak_rss_mb()}


def _warm_per_slice(network, noisy, examples, slab: int, device: str, task: str) -> float:
    """Seconds per slice of our slab-timed run, for extrapolating the slab's cold run to the volume:
    the difference of two warm runs (slab and four times the slab). The run's fixed cost (fitting the
    denoising start, the correction strength's hidden pairs) is paid once per volume, and multiplying
    it with the slices overstated a 300-slice volume by 75 times that cost. A difference over three
    slabs, not one: on 2 cores two runs of 4 and 8 slices differed by 0.45-0.92 s per slice from run
    to run, 4 and 32 slices by 0.67-0.78."""
    from medgen.infer.pipeline import RunOptions, run

    timed = []
    for m in (1, 4):
        t = time.perf_counter()
        run(network, _slab(noisy, m * slab), examples, RunOptions(task, 0, "mr", device, method="model"))
        timed.append(time.perf_counter() - t)
    return max(timed[1] - timed[0], 0.0) / (3 * slab)


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
    except (OSError, StopIteration):
        return None


def _slab(vol, slab: int):
    """The central `slab` slices of a volume (all of it when slab is 0 or covers it)."""
    n = vol.shape[0]
    if not slab or slab >= n:
        return vol
    lo = (n - slab) // 2
    return type(vol)(np.ascontiguousarray(vol.array[lo:lo + slab]), vol.spacing, vol.origin, vol.direction)


def _current_rss_mb() -> float:
    return _status_mb("VmRSS") or float("nan")


def _peak_rss_mb() -> float:
    """This process's own peak: Linux's VmHWM starts afresh at exec, whereas getrusage's
    ru_maxrss keeps the parent's peak across fork + exec (a child of a 2 GB benchmark would
    report 2 GB however little it used). getrusage only where /proc is missing (macOS: bytes)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


@torch.inference_mode()
def _universeg_volume(net: UniverSegReference, image: np.ndarray, labels: np.ndarray,
                      idx: list[int], device: str, slab: int) -> int:
    """UniverSeg's way through a volume: every slice resized to 128^2, one binary run per label
    with the k labelled slices as support, probabilities resized back. Returns slices done."""
    net = net.to(device)
    n = image.shape[0]
    todo = range(n) if not slab or slab >= n else range((n - slab) // 2, (n - slab) // 2 + slab)
    x = _to_128(image, device)
    x = (x - x.amin()) / (x.amax() - x.amin() + 1e-6)
    batch = max(1, 8 // len(idx))
    for value in (1, 2):
        y = _to_128((labels == value).astype(np.float32), device)
        support_i, support_l = x[idx][None, :, None], y[idx][None, :, None]
        out = np.zeros((len(todo),) + image.shape[1:], np.float32)
        for j in range(0, len(todo), batch):
            q = x[list(todo)[j:j + batch]][:, None]
            prob = torch.sigmoid(net(q, support_i.expand(len(q), -1, -1, -1, -1),
                                     support_l.expand(len(q), -1, -1, -1, -1)))
            out[j:j + len(q)] = F.interpolate(prob, size=image.shape[1:], mode="bilinear")[:, 0].cpu().numpy()
    return len(todo)


def _to_128(array: np.ndarray, device: str) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32), device=device)[:, None]
    return F.interpolate(t, size=(UNIVERSEG_SIZE, UNIVERSEG_SIZE), mode="bilinear", antialias=True)[:, 0]


def measure_volume(task: str, shape: tuple[int, int, int], k: int, device: str = "auto",
                   net: str = "medgen", model: str | None = None, slab: int = 0,
                   timeout: float | None = None) -> dict:
    """One volume_run in a fresh Python, so that peak RSS is this run's alone."""
    code = ("import json,sys; from medgen_dev.bench.speed import volume_run; "
            f"print(json.dumps(volume_run({task!r}, {tuple(shape)!r}, {k}, {_device(device)!r}, "
            f"{net!r}, {model!r}, {slab})))")
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env, timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _device(name: str) -> str:
    from medgen.core.device import resolve_device
    return str(resolve_device(name))
