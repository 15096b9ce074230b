"""Time planner.algorithms.solver.solve on realistic sizes: `python benchmarks/bench_solver.py`."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from planner.algorithms.solver import min_time, solve  # noqa: E402

REPS = 5


def instance(groups: int, options: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per group: time grows with option width (plus noise), error shrinks to 0 at full width."""
    rng = np.random.default_rng(seed)
    width = np.linspace(0.0, 1.0, options)
    times, errors = [], []
    for _ in range(groups):
        full = rng.uniform(1e-4, 3e-3)  # seconds for the unpruned module
        t = full * (0.05 + 0.95 * width) * rng.uniform(0.97, 1.03, options)
        e = rng.uniform(0.5, 5.0) * (1.0 - width) ** rng.uniform(1.5, 3.0) + rng.uniform(0, 1e-3, options)
        times.append(t)
        errors.append(e)
    return times, errors


def bench(groups: int, options: int, buckets: int = 10_000) -> tuple[int, int, int, int, float, float]:
    times, errors = instance(groups, options)
    dense = sum(float(t.max()) for t in times)
    lo = min_time(times)
    budgets = [lo + f * (dense - lo) for f in (0.3, 0.5, 0.8)]  # e.g. 3 speedup targets
    runs = []
    for _ in range(REPS):
        start = time.perf_counter()
        sols = solve(times, errors, budgets, n_buckets=buckets)
        runs.append(time.perf_counter() - start)
        assert all(s is not None and s.time <= s.budget for s in sols)
    return groups, options, buckets, len(budgets), statistics.median(runs), max(runs)


def main() -> None:
    print(f"{'groups':>6} {'options':>7} {'buckets':>7} {'budgets':>7} {'median_s':>9} {'max_s':>7}")
    for g, o in [(12, 13), (96, 50), (96, 100)]:
        row = bench(g, o)
        print(f"{row[0]:>6} {row[1]:>7} {row[2]:>7} {row[3]:>7} {row[4]:>9.4f} {row[5]:>7.4f}")


if __name__ == "__main__":
    main()
