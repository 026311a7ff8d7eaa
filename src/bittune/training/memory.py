"""Memory accounting: what the weights occupy by dtype, and the peak a run reached."""

from __future__ import annotations

import resource
import sys
from collections import defaultdict

import torch

MB = 1024**2


def weights_footprint(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held by parameters and buffers, by storage dtype.

    bitsandbytes keeps 4-bit weights packed two per uint8 and their block scales (absmax, and with double quant
    the scales of the scales) in a side ``quant_state`` that is neither a parameter nor a buffer; those are
    counted under ``quant_state`` so the total is what the weights really occupy.
    """
    out: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    tensors = [*model.parameters(), *model.buffers()]
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            out["quant_state"] += _quant_state_bytes(state)
        scb = getattr(t, "SCB", None)  # 8-bit row scales
        if isinstance(scb, torch.Tensor):
            out["quant_state"] += scb.numel() * scb.element_size()
    return dict(out)


def _quant_state_bytes(state: object) -> int:
    total = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_rss_bytes() -> int:
    """Peak RSS of this process image.

    Linux's ``ru_maxrss`` survives fork and exec, so a job started from a big parent (a test runner, a notebook)
    would report the parent's size; ``VmHWM`` in /proc belongs to this process image alone.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (CPU) and, on a GPU, peak CUDA memory allocated by torch."""
    out = {"peak_rss_mb": round(_peak_rss_bytes() / MB, 1)}
    if device.type == "cuda":
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / MB, 1)
        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / MB, 1)
    return out


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim(0)``); False where there is no glibc.

    glibc keeps freed blocks of its heaps (and per-thread arenas) mapped for reuse, so after a phase that
    allocated a lot (loading and converting weights, a long batch's activations) the process RSS stays at that
    phase's high-water mark although the memory is free. Trimming between phases lets the next phase's peak start
    from what is really in use. Cheap (milliseconds) when there is little to return.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return False


def reset_peak_rss() -> bool:
    """Start a new ``VmHWM`` (peak RSS) window at the current RSS, so each phase's peak can be read on its own.

    Writes ``5`` to ``/proc/self/clear_refs`` (Linux); False where that is not possible.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    """Resident memory of this process now (``VmRSS``), in MB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0
