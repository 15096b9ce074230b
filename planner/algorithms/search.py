"""SPDY's search (arXiv 2201.13096, §3.3), as pure numbers: refine per-group error coefficients by scoring the
plans they produce with a real loss.

The DP minimises Σ_g c_g · e_g(option) under the time budget; the per-layer errors e_g are local (each layer
scored alone), so how much a layer's error matters downstream is unknown to it. The coefficients c_g carry
that knowledge: each candidate vector c gives a plan (one DP solve), the caller's `evaluate` stitches that
plan and returns its calibration loss, and the search keeps the best. Candidate 0 is c = 1 (the plain DP),
and only a strictly lower loss replaces the best, so the result is never worse than the plain DP's plan on
the loss. Then random starts (log-uniform c in [lo, hi]), then mutation hill climbing from the best: a
shrinking random subset of groups has its coefficient multiplied by a log-uniform factor in [1/2, 2].

Candidate i depends only on (seed, i) and the history before it, so a search stopped anywhere resumes to
exactly the same sequence: the caller keeps every evaluated candidate (`on_candidate`) and hands them back
(`history`) to resume. Plans that the DP returns twice are not evaluated twice. No files, no model: the caller
(stages/plan.py) stores the history and stitches the plans.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import PlannerError
from ..progress import bar as progress_bar


@dataclass(frozen=True)
class SearchResult:
    coefs: list[float]          # best coefficient per group
    loss: float                 # its loss
    loss_dp: float              # the plain DP's loss (candidate 0)
    n_evaluated: int            # candidates whose plan was stitched and scored (duplicates excluded)
    n_candidates: int           # candidates generated
    history: list[dict]         # {"i", "loss", "plan_key", "best"} per candidate


def n_random_default(n: int) -> int:
    """Random starts among n candidates: a quarter, at least one."""
    return max(1, n // 4)


def _candidate(i: int, n_random: int, n_total: int, best: np.ndarray, seed: int, lo: float, hi: float):
    G = len(best)
    if i == 0:
        return np.ones(G)
    rng = np.random.default_rng([seed, i])
    if i <= n_random:
        return np.exp(rng.uniform(np.log(lo), np.log(hi), size=G))
    # hill climbing: mutate k groups, k shrinking from G/4 to 1 over the remaining candidates
    frac = (i - n_random - 1) / max(n_total - n_random - 1, 1)
    k = max(1, int(round((1 - frac) * G / 4 + frac * 1)))
    c = best.copy()
    idx = rng.choice(G, size=min(k, G), replace=False)
    c[idx] = np.clip(c[idx] * np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=len(idx))), lo, hi)
    return c


def search(n_groups: int, solve: Callable[[np.ndarray], tuple], evaluate: Callable[[tuple], float], n: int,
           seconds: float | None = None, seed: int = 0, n_random: int | None = None,
           lo: float = 0.25, hi: float = 4.0, progress: bool = True, history: list[dict] = (),
           on_candidate: Callable[[dict], None] | None = None) -> SearchResult:
    """solve(coefs) -> plan key (hashable, e.g. the DP's choices); evaluate(plan key) -> loss (lower is better).
    n: candidates in all (including the plain DP); seconds: stop generating new ones after this long.
    history: the records of a search with the same settings stopped earlier (replayed, not re-evaluated);
    on_candidate(record): called with each new candidate's record, to be kept for a resume."""
    if n < 1:
        raise PlannerError("--search needs at least 1 candidate")
    n_random = n_random_default(n) if n_random is None else n_random
    hist = list(history)
    seen: dict = {}                                              # plan key -> loss
    best_c, best_loss, loss_dp = np.ones(n_groups), np.inf, None
    t0 = time.perf_counter()
    bar = progress_bar(total=n, desc="SPDY search", progress=progress, unit="cand")
    for i in range(n):
        c = _candidate(i, n_random, n, best_c, seed, lo, hi)
        if i < len(hist):                                        # replay what an earlier run evaluated
            h = hist[i]
            key, loss = tuple(h["plan_key"]), h["loss"]
        else:
            if seconds is not None and i > 0 and time.perf_counter() - t0 > seconds:
                break
            key = tuple(int(x) for x in solve(c))
            loss = seen[key] if key in seen else float(evaluate(key))
            hist.append({"i": i, "loss": loss, "plan_key": list(key), "coefs": c.tolist(), "new": key not in seen})
            if on_candidate is not None:
                on_candidate(hist[-1])
        seen.setdefault(key, loss)
        if i == 0:
            loss_dp = loss
        if loss < best_loss:
            best_c, best_loss = c, loss
        bar.update()
        bar.set_postfix(best=f"{best_loss:.4g}", dp=f"{loss_dp:.4g}")
    bar.close()
    return SearchResult(coefs=best_c.tolist(), loss=float(best_loss), loss_dp=float(loss_dp),
                        n_evaluated=sum(bool(h.get("new", True)) for h in hist), n_candidates=len(hist),
                        history=[{"i": h["i"], "loss": h["loss"], "plan_key": h["plan_key"]} for h in hist])
