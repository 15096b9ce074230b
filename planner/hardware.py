"""Where a measurement was taken: the identity a latency profile is valid for."""
from __future__ import annotations

import contextlib
import platform
import re
import sys

import torch
import transformers


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(s: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)|cpu|@.*$|processor", "", s.lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")[:48] or "unknown"


def fast_bf16(device: str = "cpu") -> bool:
    """Whether bfloat16 matmuls run natively here: any CUDA GPU with bf16 support, or a CPU with AVX512-BF16 or
    AMX (on those, bf16 matmuls measured 4-5x faster than float32; elsewhere they are emulated and slower)."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextlib.contextmanager
def threads(n: int | None):
    """torch's CPU thread count set to `n` (None: leave it) for the block, and restored after it."""
    before = torch.get_num_threads()
    set_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def describe(device: str = "cpu", threads: int | None = None) -> dict:
    """{device, name, key, threads, torch, transformers, python}; `key` names the profile directory: the device
    and, on CPU, the thread count (`threads`, default the current one), which latency depends on."""
    threads = threads or torch.get_num_threads()
    if device == "cuda":
        name = torch.cuda.get_device_name()
        key = slug(name)
    else:
        name = cpu_name()
        key = f"{slug(name)}-t{threads}"
    return {"device": device, "name": name, "key": key, "threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}
