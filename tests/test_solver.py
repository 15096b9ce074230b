"""Tests for planner.solver: DP vs brute force, multi-budget consistency, edge cases."""
from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from planner.algorithms.solver import InfeasibleBudget, Solution, min_time, pareto_filter, solve


def brute_force(times, errors, budget):
    """(best error, best choices) over all combinations with sum(times) <= budget."""
    best = (math.inf, None)
    for combo in itertools.product(*(range(len(t)) for t in times)):
        t = sum(times[g][o] for g, o in enumerate(combo))
        if t <= budget + 1e-12:
            e = sum(errors[g][o] for g, o in enumerate(combo))
            if e < best[0]:
                best = (e, combo)
    return best


def random_instance(rng, integer_bucket=None):
    G = int(rng.integers(3, 6))
    times, errors = [], []
    for _ in range(G):
        n = int(rng.integers(2, 6))
        if integer_bucket is not None:
            times.append(rng.integers(0, 8, size=n) * integer_bucket)
        else:
            times.append(rng.uniform(0.0, 2.0, size=n))
        errors.append(rng.uniform(0.0, 1.0, size=n))
    return times, errors


@pytest.mark.parametrize("seed", range(60))
def test_dp_matches_brute_force_integer_times(seed):
    rng = np.random.default_rng(seed)
    n_buckets = 64
    bucket = 0.25  # exact in binary, so t / bucket is an exact integer
    max_budget = n_buckets * bucket
    times, errors = random_instance(rng, integer_bucket=bucket)
    budgets = [float(b) * bucket for b in rng.integers(0, n_buckets + 1, size=4)] + [max_budget]
    budgets = [max(b, bucket) for b in budgets]
    sols = solve(times, errors, budgets, n_buckets=n_buckets)
    for budget, sol in zip(budgets, sols):
        best_e, _ = brute_force(times, errors, budget)
        if budget < min_time(times):
            assert sol is None and best_e == math.inf
            continue
        assert sol is not None and sol.time <= budget
        assert sol.error == pytest.approx(best_e, abs=1e-12)
        assert sol.time == pytest.approx(sum(t[o] for t, o in zip(times, sol.choices)))
        assert sol.error == pytest.approx(sum(e[o] for e, o in zip(errors, sol.choices)))


@pytest.mark.parametrize("seed", range(60))
def test_dp_matches_rounded_brute_force_float_times(seed):
    rng = np.random.default_rng(1000 + seed)
    n_buckets = int(rng.integers(5, 40))
    times, errors = random_instance(rng)
    lo = min_time(times)
    budgets = list(rng.uniform(lo * 0.8, sum(max(t) for t in times) * 1.1, size=4))
    sols = solve(times, errors, budgets, n_buckets=n_buckets)
    feasible = [b for b in budgets if b >= lo]
    if not feasible:
        assert all(s is None for s in sols)
        return
    bucket = max(feasible) / n_buckets
    rounded = [np.ceil(np.asarray(t) / bucket) for t in times]
    for budget, sol in zip(budgets, sols):
        if budget < lo:
            assert sol is None
            continue
        assert sol is not None and sol.time <= budget
        cont_e, _ = brute_force(times, errors, budget)
        assert sol.error >= cont_e - 1e-12
        rnd_e, _ = brute_force(rounded, errors, math.floor(budget / bucket))
        if rnd_e < math.inf:
            assert sol.error == pytest.approx(rnd_e, abs=1e-12)
        else:  # feasible in seconds only: fall back to the fastest plan
            assert sol.time == pytest.approx(lo)


@pytest.mark.parametrize("seed", range(20))
def test_multi_budget_equals_single_calls(seed):
    rng = np.random.default_rng(2000 + seed)
    times, errors = random_instance(rng)
    top = sum(max(t) for t in times)
    budgets = list(rng.uniform(min_time(times), top, size=3))
    together = solve(times, errors, budgets + [top], n_buckets=200)
    for i, b in enumerate(budgets):
        alone = solve(times, errors, [b, top], n_buckets=200)[0]
        assert alone == together[i]


def test_infeasible_min_time_and_huge_budget():
    times = [[1.0, 2.0, 3.0], [0.5, 1.5], [2.0, 0.25, 4.0]]
    errors = [[3.0, 1.0, 0.0], [2.0, 0.0], [0.5, 9.0, 0.0]]
    lo = min_time(times)
    assert lo == pytest.approx(1.75)
    none, at_min, huge = solve(times, errors, [lo * 0.99, lo, 1e6])
    assert none is None
    assert at_min == Solution(choices=(0, 0, 1), time=lo, error=14.0, budget=lo)
    assert huge.choices == (2, 1, 2) and huge.error == 0.0 and huge.time == 8.5
    assert solve(times, errors, [0.1]) == [None]


def test_fallback_when_rounding_makes_budget_infeasible():
    # bucket = 2/3 s: each 1.0 s rounds up to 2 buckets, 4 > floor(2.0 / bucket) = 3 buckets,
    # yet the fastest plan takes exactly 2.0 s, so it must still be returned.
    times = [[1.0, 5.0], [1.0, 5.0]]
    errors = [[1.0, 0.0], [1.0, 0.0]]
    sol = solve(times, errors, [2.0], n_buckets=3)[0]
    assert sol == Solution(choices=(0, 0), time=2.0, error=2.0, budget=2.0)


def test_min_time_tie_breaks_by_error():
    times = [[1.0, 1.0, 3.0]]
    errors = [[5.0, 2.0, 0.0]]
    sol = solve(times, errors, [1.0])[0]
    assert sol.choices == (1,) and sol.error == 2.0


def test_duplicates_and_dominated_map_back_to_original_indices():
    times = [[3.0, 1.0, 1.0, 2.0, 2.5]]
    errors = [[0.0, 4.0, 4.0, 1.0, 2.0]]  # option 4 dominated by 3, option 2 duplicates 1
    assert solve(times, errors, [2.2])[0].choices == (3,)
    assert solve(times, errors, [1.0])[0].choices == (1,)
    assert solve(times, errors, [10.0])[0].choices == (0,)


@pytest.mark.parametrize("seed", range(40))
def test_pareto_filter_against_brute_force(seed):
    rng = np.random.default_rng(3000 + seed)
    n = int(rng.integers(1, 12))
    t = rng.integers(0, 5, size=n).astype(float)  # small ints -> many ties
    e = rng.integers(0, 5, size=n).astype(float)
    kept = pareto_filter(t, e)
    nondom = {
        (t[i], e[i])
        for i in range(n)
        if not any(t[j] <= t[i] and e[j] <= e[i] and (t[j] < t[i] or e[j] < e[i]) for j in range(n))
    }
    pairs = [(t[i], e[i]) for i in kept]
    assert set(pairs) == nondom and len(pairs) == len(nondom)  # ties keep exactly one
    assert list(t[kept]) == sorted(t[kept])


@pytest.mark.parametrize(
    "times, errors, budgets, kw, msg",
    [
        ([[1.0]], [[1.0], [2.0]], [1.0], {}, "groups"),
        ([[1.0, 2.0]], [[1.0]], [1.0], {}, "equal-length"),
        ([[]], [[]], [1.0], {}, "no options"),
        ([], [], [1.0], {}, "no groups"),
        ([[-1.0]], [[1.0]], [1.0], {}, "times must be finite"),
        ([[math.inf]], [[1.0]], [1.0], {}, "times must be finite"),
        ([[math.nan]], [[1.0]], [1.0], {}, "times must be finite"),
        ([[1.0]], [[math.nan]], [1.0], {}, "NaN"),
        ([[1.0]], [[1.0]], [0.0], {}, "budgets"),
        ([[1.0]], [[1.0]], [-2.0], {}, "budgets"),
        ([[1.0]], [[1.0]], [math.inf], {}, "budgets"),
        ([[1.0]], [[1.0]], [1.0], {"n_buckets": 0}, "n_buckets"),
    ],
)
def test_validation(times, errors, budgets, kw, msg):
    with pytest.raises(ValueError, match=msg):
        solve(times, errors, budgets, **kw)


def test_infeasible_budget_is_value_error():
    assert issubclass(InfeasibleBudget, ValueError)


def test_solver_does_not_import_torch():
    # load solver.py on its own (the package __init__ brings the torch-based API; the solver itself must not)
    path = str(Path(__file__).resolve().parents[1] / "planner" / "algorithms" / "solver.py")
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('solver', %r); "
            "m = importlib.util.module_from_spec(s); sys.modules['solver'] = m; s.loader.exec_module(m); "
            "assert 'torch' not in sys.modules; m.solve([[1.0]], [[0.0]], [2.0])" % path)
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
