"""Wall-clock timing under stated conditions: warm-up to a steady state, interleaved repetitions, confidence
intervals, CUDA events on GPU.

Measured on the 2-core CPU this project is built on (all-MiniLM-L6-v2, batch 8 x 128): a freshly built model's
first calls run 30-70% slower than its steady state, for about ten calls (allocator and caches settling); one
warm-up call, as the profile and verify had, left the same variant measuring 2.20x and 2.87x back to back. Within
an interleaved run, per-pair ratios of an identical copy spread +-5% (p10-p90), so a ratio needs tens of pairs
to be known to 1-2%: verify and the closed loop keep adding pairs until its confidence interval is that narrow.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from . import hardware

# Set once this process has trained a model (recover/distill). The same one-shot 3x weights timed 3.13x against the
# dense model before a 1-minute recovery in the process and 2.93x after it (3.14x with the recovery in a spawned
# child; docs/results.md, "Timing after training"); the jobs train in a child, and verify warns when it times here.
_TRAINED_HERE = False


def mark_trained() -> None:
    global _TRAINED_HERE
    _TRAINED_HERE = True


def trained_here() -> bool:
    """Whether this process has trained a model: its CPU timings can read slow afterwards."""
    return _TRAINED_HERE


def time_calls(fn: Callable[[], object], reps: int, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Seconds per call for `reps` calls after `warmup` untimed ones, under the steady allocator
    (hardware.steady_allocator: glibc's dynamic thresholds made the same pair of models measure 1.94x-2.27x)."""
    hardware.steady_allocator()
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


def warm_up(fn: Callable[[], object], device: str = "cpu", min_calls: int = 3, max_calls: int = 30,
            max_seconds: float = 10.0, rel: float = 0.05) -> int:
    """Call `fn` until it runs at a steady pace: the last three calls within `rel` of their median, after at
    least `min_calls` and at most `max_calls` calls or `max_seconds`. Returns the number of calls made."""
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < max_calls and (time.perf_counter() - t0 < max_seconds or len(times) < min_calls):
        times.extend(time_calls(fn, 1, 0, device))
        if len(times) >= min_calls:
            last = np.asarray(times[-3:])
            if np.all(np.abs(last / np.median(last) - 1) <= rel):
                break
    return len(times)


def median_ci(xs, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: order statistics k and n-1-k where the binomial
    (n, 1/2) tail has mass (1-level)/2 (normal approximation; exact enough from n = 6). Fewer than 6 values:
    their range."""
    x = np.sort(np.asarray(xs, dtype=float))
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    if n < 6:
        return float(x[0]), float(x[-1])
    z = {0.9: 1.645, 0.95: 1.96, 0.99: 2.576}.get(level, 1.96)
    k = max(0, int(math.floor(n / 2 - z * math.sqrt(n) / 2)))
    return float(x[k]), float(x[n - 1 - k])


@dataclass(frozen=True)
class Ratio:
    """An interleaved measurement of time(B) / time(A): the median per-pair ratio and its confidence interval."""
    value: float            # median of the per-pair ratios
    lo: float
    hi: float
    pairs: int
    a_median: float         # seconds per call
    b_median: float

    @property
    def halfwidth(self) -> float:
        """Half the interval, relative to the value."""
        return (self.hi - self.lo) / 2 / self.value

    def to_dict(self) -> dict:
        return asdict(self)


def ratio_of(ta, tb) -> Ratio:
    """The Ratio of paired timings (ta[i], tb[i] taken next to each other)."""
    r = np.asarray(tb, dtype=float) / np.asarray(ta, dtype=float)
    lo, hi = median_ci(r)
    return Ratio(float(np.median(r)), lo, hi, len(r), median(ta), median(tb))


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
