"""Wall-clock timing under stated conditions: warm-up, repetitions, CUDA events on GPU."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch


def time_calls(fn: Callable[[], object], reps: int, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Seconds per call for `reps` calls after `warmup` untimed ones."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        out = []
        if device == "cuda":
            torch.cuda.synchronize()
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / 1e3)
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    return out


def interleaved(fns: list[Callable[[], object]], rounds: int, device: str = "cpu", start: int = 0) -> list[list[float]]:
    """The one interleaved timer: `rounds` timings of each callable, round r calling them in the order rotated by
    (start + r) (A B, B A, A B, ... for two; A B C, B C A, C A B, ... for three), so that drift of a shared
    machine (load from other processes, frequency changes) hits every one alike and ratios of their medians cancel
    it where differences keep it. Returns seconds per call, one list per callable. Warm them up first."""
    out = [[] for _ in fns]
    n = len(fns)
    for r in range(rounds):
        k = (start + r) % n
        for i in [*range(k, n), *range(k)]:
            out[i].extend(time_calls(fns[i], 1, 0, device))
    return out


def abba(fa: Callable[[], object], fb: Callable[[], object], pairs: int, device: str = "cpu",
         start: int = 0) -> tuple[list[float], list[float]]:
    """`interleaved` for two callables: (seconds of A per call, seconds of B per call), pair i starting with A
    when (start + i) is even."""
    ta, tb = interleaved([fa, fb], pairs, device, start)
    return ta, tb


def median(xs) -> float:
    return float(np.median(np.asarray(xs, dtype=float)))


def spread(xs) -> float:
    """Half the 10–90 percentile range: a robust ± for noisy timings."""
    xs = np.asarray(xs, dtype=float)
    if len(xs) < 2:
        return 0.0
    return float((np.percentile(xs, 90) - np.percentile(xs, 10)) / 2)
