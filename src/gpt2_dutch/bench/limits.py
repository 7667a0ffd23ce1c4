"""The machine the benchmark runs on and what bounds its speed: matmul peak per dtype, memory bandwidth."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "device": gpu or f"{cpu}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "python": platform.python_version()}


def _best_seconds(fn: Any, args: tuple, repeats: int, sync: Any) -> float:
    fn(*args)
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_limits(quick: bool) -> dict[str, Any]:
    """Matmul peak per dtype (best of several square matmuls) and memory bandwidth (copy and read)."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = 8192 if cuda else (1024 if quick else 2048)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16} | ({"fp16": torch.float16} if cuda else {})
    peaks = {}
    for name, dtype in dtypes.items():
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        peaks[name] = 2 * n**3 / _best_seconds(torch.matmul, (a, b), 3 if quick else 5, sync)
        del a, b
    size = (64 if quick else 512) * 2**20 // 4 * (8 if cuda else 1)  # floats; far larger than any cache
    src = torch.ones(size, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(torch.Tensor.copy_, (dst, src), 5, sync)
    read_s = _best_seconds(torch.sum, (src,), 5, sync)
    del src, dst
    return {"matmul_flops": peaks, "matmul_size": n, "copy_bytes_per_s": 2 * size * 4 / copy_s,
            "read_bytes_per_s": size * 4 / read_s}
