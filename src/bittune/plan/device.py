"""What the device can do, measured once per process: matmul rate, memory bandwidth, k-bit overhead, free memory.

Each probe takes well under a second and is cached, so ``estimate`` can be called many times (tests, sweeps).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DeviceInfo:
    """The numbers a plan needs about one device.

    Attributes:
        kind: ``cpu`` or ``cuda``.
        name: Human-readable device name.
        total_mb: Memory of the device (CPU: RAM; GPU: the card).
        available_mb: What a new run can use now (CPU: ``psutil`` available; GPU: ``mem_get_info`` free).
    """

    kind: str
    name: str
    total_mb: float | None
    available_mb: float | None


def device_info(kind: str) -> DeviceInfo:
    """Memory of ``kind`` (``cpu``/``cuda``). For ``cuda`` without a visible GPU, the numbers are unknown (None)."""
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return DeviceInfo("cuda", "cuda (not visible here)", None, None)
        free, total = torch.cuda.mem_get_info()
        return DeviceInfo("cuda", torch.cuda.get_device_name(), total / 2**20, free / 2**20)
    import os
    import platform

    import psutil

    vm = psutil.virtual_memory()
    name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return DeviceInfo("cpu", name, vm.total / 2**20, vm.available / 2**20)


def _timed(fn, repeats: int) -> float:
    """Best of ``repeats`` wall times of ``fn()`` (after one warm-up call): the least disturbed run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def matmul_flops(kind: str, m: int = 2048, k: int = 2048, n: int = 2048) -> float:
    """Measured matmul rate in FLOP/s of an (m x k) @ (k x n) product: float32 on CPU, bfloat16 on a GPU.

    ``estimate`` passes the model's own MLP shape (tokens x hidden @ hidden x intermediate): small matrices run
    far below a device's peak, and that is the rate a small model's step sees. Best of a few runs into a
    preallocated output: on a shared machine other work only ever slows a run down.
    """
    import torch

    gpu = kind == "cuda"
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    a, b = torch.randn(m, k, device=dev, dtype=dtype), torch.randn(k, n, device=dev, dtype=dtype)
    c = torch.empty(m, n, device=dev, dtype=dtype)
    # Enough products per timing for ~10 ms of work on a GPU, one on CPU (each is already milliseconds there).
    reps = max(1, int(2e12 / (2 * m * k * n))) if gpu else 1

    def run() -> None:
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        if gpu:
            torch.cuda.synchronize()

    # Many short samples: on a shared CPU the best one is likely to have found the cores idle.
    return reps * 2 * m * k * n / _timed(run, 5 if gpu else 20)


@functools.cache
def memory_bandwidth(kind: str) -> float:
    """Measured bytes/s of an elementwise op that writes a fresh tensor, as training's non-matmul ops do.

    On CPU the fresh output costs page faults as well as bytes, which is why this is measured with a new
    allocation every time rather than in place.
    """
    import torch

    n = 16 * 2**20  # 64 MiB of float32
    dev = "cuda" if kind == "cuda" else "cpu"
    x = torch.randn(n, device=dev)

    def run() -> None:
        y = x * 1.0001
        if kind == "cuda":
            torch.cuda.synchronize()
        del y

    return 2 * 4 * n / _timed(run, 3)  # read x, write y


@functools.cache
def kbit_seconds_per_weight(kind: str, bits: int) -> float:
    """Measured extra seconds per quantized weight element each time a k-bit Linear runs (the dequantization).

    Found as the time of a bitsandbytes k-bit Linear minus a plain Linear of the same shape, on few tokens so that
    the matmul itself is small. Zero when bitsandbytes is missing (the run would fail anyway, in the config check).
    """
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0.0
    dev = "cuda" if kind == "cuda" else "cpu"
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    k = n = 2048
    dense = torch.nn.Linear(k, n, bias=False, dtype=dtype)
    if bits == 4:
        qlayer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4")
    else:
        qlayer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False)
    qlayer.load_state_dict(dense.state_dict())
    qlayer, dense = qlayer.to(dev), dense.to(dev)
    x = torch.randn(16, k, device=dev, dtype=dtype)

    def run(layer: torch.nn.Module) -> None:
        with torch.no_grad():
            for _ in range(4):
                layer(x)
        if kind == "cuda":
            torch.cuda.synchronize()

    extra = _timed(lambda: run(qlayer), 5) - _timed(lambda: run(dense), 5)
    return max(extra, 0.0) / (4 * k * n)


# Seam: "float32" or "bfloat16" replaces the measurement's answer (tests run as on a CPU without fast bf16, and
# force bf16 where they test that path; also a diagnostic). Not a setting: train.mixed_precision is the user's.
FORCE_CPU_DTYPE_ENV = "BITTUNE_FORCE_CPU_DTYPE"
# bf16 must beat float32 by this much to be chosen: below it, bf16's rounding is not worth a marginal gain.
BF16_MIN_SPEEDUP = 1.3


@functools.cache
def cpu_matmul_rates(m: int = 512, k: int = 576, n: int = 1536) -> dict[str, float]:
    """Measured FLOP/s of an (m x k) @ (k x n) CPU matmul in float32 and in bfloat16, with the threads in use.

    The default shape is a small model's MLP on a micro-batch (SmolLM2-135M: hidden 576, intermediate 1,536):
    the rate a training step of such a model sees. CPUs with AMX or AVX512-BF16 run bf16 several times faster
    than float32; CPUs without them (e.g. AMD Zen 1/2) emulate it and run it up to ~60x slower. ~0.1 s.
    """
    import torch

    rates = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        c = torch.empty(m, n, dtype=dtype)
        seconds = _timed(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c), 5)
        rates[name] = 2 * m * k * n / seconds
    return rates


def fastest_cpu_dtype(min_speedup: float = BF16_MIN_SPEEDUP) -> torch.dtype:
    """``torch.bfloat16`` where this CPU runs a bf16 matmul at least ``min_speedup`` x float32's rate, else float32.

    Measured, never assumed from CPU flags: the flags say what the CPU can decode, not what torch's kernels make
    of it. Cached per process; the environment variable ``BITTUNE_FORCE_CPU_DTYPE`` (``float32`` / ``bfloat16``)
    replaces the answer (a test seam). Use the result as the autocast dtype of training on CPU (weights, optimizer state
    and the loss stay float32) and as the storage dtype of a frozen base.
    """
    import torch

    forced = os.environ.get(FORCE_CPU_DTYPE_ENV)
    if forced in ("float32", "bfloat16"):
        return getattr(torch, forced)
    rates = cpu_matmul_rates()
    return torch.bfloat16 if rates["bfloat16"] >= min_speedup * rates["float32"] else torch.float32
