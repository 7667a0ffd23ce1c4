"""Which device and precision a stage runs on, and which process of a distributed run this is.

Foundations for every stage: no stage imports another stage for these. torch is imported inside the functions
so that building the command line (`--help`) stays light.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpt2_dutch.core.errors import UsageError, check


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs where bf16 matmuls beat fp32 (measured: docs/experiments/throughput.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str) -> str:
    """The training precision: bf16, fp16 (CUDA only) or fp32; `auto` picks what the device runs fast."""
    import torch

    if requested != "auto":
        if requested == "fp16":
            check(torch.cuda.is_available(), "--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def world_size() -> int:
    """Processes in this run (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(device: str):  # -> torch.device
    """`auto` (cuda if available), cpu, cuda, cuda:N."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown --device '{device}'; use cpu, cuda or cuda:N") from None
    check(dev.type != "cuda" or torch.cuda.is_available(), f"--device {device}: no CUDA GPU is available")
    return dev


def resolve_dtype(dtype: str, device):  # -> torch.dtype
    """Inference weights dtype: `auto` is bf16 on GPUs and CPUs with fast bf16, else fp32."""
    import torch

    if dtype == "auto":
        fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
        return torch.bfloat16 if fast_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
