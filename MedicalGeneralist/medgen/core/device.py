"""Where the model runs and how much it may hold at once.

The memory guard sizes batches from the memory actually free instead of from a fixed constant,
so a large volume is processed in more, smaller chunks rather than running out of memory. Free
memory is read portably: CUDA and Apple MPS through torch's own queries, host memory through
psutil (Linux, Windows, macOS alike), with a POSIX page count and then a fixed, modest guess as
fallbacks where psutil is missing (the free-memory question must never crash a run).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from medgen.core.errors import InputError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; an explicit device must exist."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("the CUDA device was asked for but this torch has no usable CUDA GPU "
                         f"(torch {torch.__version__}): choose the CPU or automatic device, or install "
                         "a CUDA build of torch")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("the Apple MPS device was asked for but is not available: choose the CPU or "
                         "automatic device")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """CPU threads for torch; None or 0 leaves torch's default (all cores)."""
    if threads:
        torch.set_num_threads(int(threads))


def autocast(device: torch.device):
    """Mixed precision on CUDA only: CPU bfloat16 is slower than float32 on most CPUs."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


FALLBACK_FREE_BYTES = 2 * 1024**3  # when nothing can tell: small enough for a laptop


def free_bytes(device: torch.device) -> int:
    """Memory available for new tensors on the device."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    host = host_free_bytes()
    if device.type == "mps":  # unified memory: the host's free memory, within Metal's own budget
        return min(host, mps_free_bytes())
    return host


def host_free_bytes() -> int:
    """Free host memory: psutil where installed, else the POSIX page count, else a fixed guess.

    os.sysconf has no SC_AVPHYS_PAGES on macOS and no sysconf at all on Windows, so the page
    count is only asked where the platform has it.
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    names = getattr(os, "sysconf_names", {})
    if "SC_AVPHYS_PAGES" in names and "SC_PAGE_SIZE" in names:
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (OSError, ValueError):
            pass
    return FALLBACK_FREE_BYTES


def mps_free_bytes() -> int:
    """What Metal still allows this process to allocate (torch's own MPS accounting)."""
    mps = getattr(torch, "mps", None)
    try:
        return max(0, int(mps.recommended_max_memory()) - int(mps.driver_allocated_memory()))
    except (AttributeError, RuntimeError):  # an older torch without these queries
        return FALLBACK_FREE_BYTES


def batch_limit(bytes_per_item: int, device: torch.device, fraction: float = 0.25,
                cap: int = 64) -> int:
    """How many items fit into a fraction of free memory (at least one, at most `cap`)."""
    return max(1, min(cap, int(free_bytes(device) * fraction // max(bytes_per_item, 1))))
