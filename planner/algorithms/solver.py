"""SPDY / ZipLM dynamic program: pick one option per group under a time budget.

Each group g (one prunable module) has options with time ``t[g][o] >= 0`` seconds and
error ``e[g][o]``; we minimise the summed error subject to the summed time <= budget.

Times are discretised into ``n_buckets`` buckets of ``max(feasible budgets) / n_buckets``
seconds.  Each option's time is rounded UP to whole buckets and each budget DOWN, so any
plan that fits in buckets provably fits in real seconds: the solver never returns a plan
over budget, at the price of being (slightly) conservative.  The table is built once for
the largest budget; because it is indexed by "bucket budget b", every smaller budget is
answered from the same table by reading a different column and backtracking from there.

Pure numpy, no torch: the planner can solve without a GPU stack imported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["InfeasibleBudget", "Solution", "min_time", "pareto_filter", "solve"]


class InfeasibleBudget(ValueError):
    """For callers that need a plan: ``solve`` returns None per budget below ``min_time``
    (it never raises this itself); raise this when such a None is unacceptable."""


@dataclass(frozen=True)
class Solution:
    choices: tuple[int, ...]  # option index per group, into the ORIGINAL option arrays
    time: float  # sum of chosen times (real, unrounded seconds)
    error: float  # sum of chosen errors
    budget: float  # the budget this plan was solved for


def _check(times: Sequence[ArrayLike], errors: Sequence[ArrayLike]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(times) != len(errors):
        raise ValueError(f"times has {len(times)} groups but errors has {len(errors)}")
    if len(times) == 0:
        raise ValueError("no groups to solve")
    ts, es = [], []
    for g, (t, e) in enumerate(zip(times, errors)):
        t = np.asarray(t, dtype=np.float64)
        e = np.asarray(e, dtype=np.float64)
        if t.ndim != 1 or e.ndim != 1 or t.shape != e.shape:
            raise ValueError(f"group {g}: times {t.shape} and errors {e.shape} must be equal-length 1-D")
        if t.size == 0:
            raise ValueError(f"group {g}: no options")
        if not np.all(np.isfinite(t)) or np.any(t < 0):
            raise ValueError(f"group {g}: times must be finite and >= 0, got {t.tolist()}")
        if np.any(np.isnan(e)) or np.any(e == -np.inf):
            raise ValueError(f"group {g}: errors must not be NaN or -inf, got {e.tolist()}")
        ts.append(t)
        es.append(e)
    return ts, es


def min_time(times: Sequence[ArrayLike]) -> float:
    """Fastest reachable total: sum over groups of the fastest option (exact fsum)."""
    return math.fsum(float(np.min(np.asarray(t, dtype=np.float64))) for t in times)


def pareto_filter(times_g: ArrayLike, errors_g: ArrayLike) -> np.ndarray:
    """Indices of the non-dominated options of one group, sorted by time (then error).

    Dropping dominated options is exact for the DP (a dominated option can always be
    swapped for its dominator without losing time or error) and shrinks the work.
    Exact duplicates keep one representative (the lowest original index).
    """
    t = np.asarray(times_g, dtype=np.float64)
    e = np.asarray(errors_g, dtype=np.float64)
    if t.ndim != 1 or t.shape != e.shape or t.size == 0:
        raise ValueError(f"pareto_filter needs equal-length non-empty 1-D arrays, got {t.shape}, {e.shape}")
    order = np.lexsort((e, t))  # by time, then error; stable so duplicates keep lowest index
    es = e[order]
    # Keep an option iff its error is strictly below every faster-or-equal option's error.
    prev_best = np.concatenate(([np.inf], np.minimum.accumulate(es)[:-1]))
    keep = es < prev_best
    keep[0] = True  # the fastest (lowest-error among ties) always survives, even at e=inf
    return order[keep]


def solve(
    times: Sequence[ArrayLike],
    errors: Sequence[ArrayLike],
    budgets: Sequence[float],
    n_buckets: int = 10_000,
) -> list[Solution | None]:
    """Min-error plan per budget (None where budget < min_time), all from one DP table."""
    ts, es = _check(times, errors)
    if int(n_buckets) != n_buckets or n_buckets < 1:
        raise ValueError(f"n_buckets must be an integer >= 1, got {n_buckets!r}")
    n_buckets = int(n_buckets)
    budgets = [float(b) for b in budgets]
    for b in budgets:
        if not (math.isfinite(b) and b > 0):
            raise ValueError(f"budgets must be finite and > 0, got {b!r}")
    t_min = min_time(ts)
    feasible = [b for b in budgets if b >= t_min]
    if not feasible:
        return [None] * len(budgets)

    keep = [pareto_filter(t, e) for t, e in zip(ts, es)]
    ft = [t[k] for t, k in zip(ts, keep)]
    fe = [e[k] for e, k in zip(es, keep)]
    bucket = max(feasible) / n_buckets
    nb = n_buckets + 1
    # Round times UP (clipped so huge times cannot overflow; > n_buckets never fits anyway).
    ti = [np.minimum(np.ceil(t / bucket), nb).astype(np.int64) for t in ft]

    # dp[b] = min error of groups so far with total bucket-time <= b ("at most" form, so the
    # answer for budget B is dp[B] directly; equivalent to argmin over b <= B of the exact form).
    dp = np.zeros(nb)
    choice = np.zeros((len(ft), nb), dtype=np.int16 if max(map(len, ft)) < 2**15 else np.int32)
    for g in range(len(ft)):
        new = np.full(nb, np.inf)
        ch = choice[g]
        for o in range(len(ft[g])):
            d = int(ti[g][o])
            if d >= nb:
                break  # options are sorted by time: the rest cannot fit either
            cand = dp[: nb - d] + fe[g][o]
            better = cand < new[d:]  # strict: ties keep the faster option
            np.copyto(new[d:], cand, where=better)
            np.copyto(ch[d:], o, where=better)
        dp = new

    def plan(filtered: list[int], budget: float) -> Solution:
        idx = tuple(int(k[c]) for k, c in zip(keep, filtered))
        return Solution(
            choices=idx,
            time=math.fsum(float(t[i]) for t, i in zip(ts, idx)),
            error=math.fsum(float(e[i]) for e, i in zip(es, idx)),
            budget=budget,
        )

    fastest = plan([0] * len(ft), 0.0)  # index 0 after pareto = fastest, ties by lower error
    out: list[Solution | None] = []
    for budget in budgets:
        if budget < t_min:
            out.append(None)
            continue
        sol = None
        b_top = min(int(math.floor(budget / bucket)), n_buckets)
        # Normally the first b works; lower b only guards float round-off in t/bucket.
        for b_k in range(b_top, max(b_top - 3, -1), -1):
            if not np.isfinite(dp[b_k]):
                break  # feasible in seconds but not after rounding up: use the fastest plan
            picks, b = [], b_k
            for g in range(len(ft) - 1, -1, -1):
                o = int(choice[g, b])
                picks.append(o)
                b -= int(ti[g][o])
            cand_sol = plan(picks[::-1], budget)
            if cand_sol.time <= budget:
                sol = cand_sol
                break
        if sol is None:
            sol = Solution(fastest.choices, fastest.time, fastest.error, budget)
        assert sol.time <= budget, (sol.time, budget)
        out.append(sol)
    return out
