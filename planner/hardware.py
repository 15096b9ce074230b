"""Where a measurement was taken: the identity a latency profile is valid for."""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import sys

import torch
import transformers

from .errors import PlannerError


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


def check_device(device: str, flag: str = "--device") -> None:
    """Refuse a device this machine does not have, in one line, before any work (a CUDA call on a CPU-only
    build fails deep inside torch with "Torch not compiled with CUDA enabled")."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise PlannerError(f"{flag} {device} asked for, but CUDA is not available here; use {flag} cpu")


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


# glibc's mallopt parameters (malloc.h) and the value planner fixes them at while it times
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
STEADY_BYTES = 1 << 30
_allocator: str | None = None


def steady_allocator() -> str:
    """Fix the C allocator's mmap and trim thresholds for this process (glibc, once; idempotent), and say what the
    timings are measured under.

    Why: with glibc's default, dynamic thresholds, activations of a forward above the current threshold are
    mmapped and their pages faulted in again every call, and freed heap is trimmed back to the OS, in amounts that
    depend on what the process allocated before. On the 2-core CI machine kind, all-MiniLM-L6-v2 at batch 8 x 128
    took 194-221 ms per forward that way and 145-160 ms with the thresholds fixed, and a 2x plan's speedup
    measured 2.27x in a fresh process and 1.94x after the process had scattered 9 GB of tensors over its heap;
    with the thresholds fixed, 1.98x and 1.97x. Profile, closed loop and verify all call this before timing, so
    they measure the same, stable thing. To run a compressed model at the speed measured, set
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 in its environment (or call this).
    PLANNER_ALLOCATOR=default leaves the allocator alone (timings then depend on the process's history). Costs
    memory: up to 1 GiB freed is kept by the process instead of returned to the OS."""
    global _allocator
    if _allocator is not None:
        return _allocator
    _allocator = "default"
    if os.environ.get("PLANNER_ALLOCATOR", "").lower() == "default" or not sys.platform.startswith("linux"):
        return _allocator
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") and os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        _allocator = "glibc, thresholds fixed by the environment"
        return _allocator
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, STEADY_BYTES) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, STEADY_BYTES) == 1
    except (OSError, AttributeError):                # not glibc (musl, ...): nothing to fix
        ok = False
    if ok:
        _allocator = f"glibc, mmap and trim thresholds fixed at {STEADY_BYTES >> 20} MiB"
    return _allocator


def allocator() -> str:
    """What timings in this process are measured under (steady_allocator has run or not)."""
    return _allocator or "default"


def describe(device: str = "cpu", threads: int | None = None) -> dict:
    """{device, name, key, threads, torch, transformers, python}; `key` names the profile directory: the device
    and, on CPU, the thread count (`threads`, default the current one), which latency depends on."""
    threads = threads or torch.get_num_threads()
    if device == "cuda" and not torch.cuda.is_available():
        # a CUDA profile read on a machine without CUDA: no GPU here to compare it with (check_profile then asks
        # for --allow-other-machine, plan's closed loop stays open)
        name, key = "no CUDA device", "no-cuda"
    elif device == "cuda":
        name = torch.cuda.get_device_name()
        key = slug(name)
    else:
        name = cpu_name()
        key = f"{slug(name)}-t{threads}"
    return {"device": device, "name": name, "key": key, "threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "allocator": allocator()}
