"""End-to-end search over a plan's per-module choices, as pure numbers (EvoPress, arXiv 2410.14649; DarwinLM,
arXiv 2502.07780).

The DP minimises the sum of per-module errors, each measured with the rest of the model dense. EvoPress finds that
"error monotonicity does not hold": a plan with a smaller sum can be worse end to end. So the DP's plan is only
the seed. The search keeps one parent and, each generation, makes `offspring` mutants by level switches (one
module one option up, more kept, another one option down, so the time budget still holds; more down-moves while
it does not), scores them cheaply, and scores the best `survivors` again at the highest fidelity, where a mutant
replaces the parent only if it is strictly better. Fidelities are the caller's (few calibration tokens first,
more for the survivors), so that most of the time goes to the candidates that may win. The parent is scored at
the highest fidelity first, so the result is never worse there than the seed.

Generation g's mutants depend only on (seed, g) and the parent, so a search resumed from its history (every
evaluated (candidate, fidelity, loss)) replays to the same sequence without re-evaluating anything. No files, no
model: stages/plan.py builds and scores the candidates and keeps the history.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..progress import bar as progress_bar


@dataclass(frozen=True)
class SearchResult:
    choice: list[int]           # option index per group of the best candidate
    loss: float                 # its loss at the highest fidelity
    loss_seed: float            # the seed's loss at the highest fidelity
    n_evaluated: int            # evaluations done (every fidelity), replayed ones included
    n_candidates: int           # distinct candidates generated
    generations: int
    improvements: int           # generations whose survivor replaced the parent
    history: list[dict] = field(default_factory=list)   # {"key", "fidelity", "loss", "generation"} per evaluation


def level_switch(choice, order: list[np.ndarray], times: list[np.ndarray], budget: float, rng, n_switch: int):
    """A mutant of `choice` (option index per group): n_switch times one group moves one option up in time
    (keeps more) and another one down; then down-moves in random groups while the total time is over `budget`.
    order[g]: group g's option indices by increasing time. None if no such mutant exists."""
    rank = [int(np.flatnonzero(order[g] == c)[0]) for g, c in enumerate(choice)]
    G = len(rank)
    for _ in range(n_switch):
        ups = [g for g in range(G) if rank[g] < len(order[g]) - 1]
        downs = [g for g in range(G) if rank[g] > 0]
        if not ups or not downs:
            return None
        up = int(rng.choice(ups))
        down = int(rng.choice([g for g in downs if g != up] or downs))
        rank[up] += 1
        rank[down] -= 1
    total = lambda: sum(times[g][order[g][rank[g]]] for g in range(G))      # noqa: E731
    for _ in range(4 * G):
        if total() <= budget:
            out = tuple(int(order[g][rank[g]]) for g in range(G))
            return None if out == tuple(int(c) for c in choice) else out
        downs = [g for g in range(G) if rank[g] > 0]
        if not downs:
            return None
        rank[int(rng.choice(downs))] -= 1
    return None


def evolve(seed: list[int], times: list[np.ndarray], budget: float, evaluate: Callable[[tuple, int], float],
           fidelities: tuple[int, ...] = (0, 1), offspring: int = 8, survivors: int = 2,
           max_candidates: int | None = None, seconds: float | None = None, rng_seed: int = 0,
           history: list[dict] = (), on_record: Callable[[dict], None] | None = None,
           progress: bool = True) -> SearchResult:
    """Search from `seed` (option index per group) under `budget` (the sum of times[g][choice[g]] may not exceed
    it). evaluate(candidate, fidelity) -> loss, lower is better. Stops after `max_candidates` distinct
    candidates or `seconds` (checked between evaluations, and a generation starts only while the time left is
    at least the last generation's), or when no new mutant can be made.
    history / on_record: earlier evaluations to replay, and a callback with each new one (module docstring)."""
    order = [np.argsort(np.asarray(t), kind="stable") for t in times]
    cache = {(tuple(h["key"]), h["fidelity"]): h["loss"] for h in history}
    records = list(history)
    top = fidelities[-1]
    t0 = time.perf_counter()
    n_eval = 0

    def score(cand: tuple, fid: int, gen: int) -> float:
        nonlocal n_eval
        n_eval += 1
        key = (cand, fid)
        if key not in cache:
            cache[key] = float(evaluate(cand, fid))
            rec = {"key": list(cand), "fidelity": fid, "loss": cache[key], "generation": gen}
            records.append(rec)
            if on_record is not None:
                on_record(rec)
        return cache[key]

    def out_of_time() -> bool:
        return seconds is not None and time.perf_counter() - t0 > seconds

    parent = tuple(int(c) for c in seed)
    parent_loss = seed_loss = score(parent, top, 0)
    seen = {parent}
    gen = improvements = 0
    last_gen = 0.0                                   # seconds the last generation took
    bar = progress_bar(total=max_candidates, desc="search", unit="cand", progress=progress)
    while not out_of_time() and (max_candidates is None or len(seen) < max_candidates):
        if seconds is not None and time.perf_counter() - t0 + last_gen > seconds:
            # a generation the time left cannot finish would score mutants whose survivors are never scored at
            # the top fidelity: its evaluations could not change the result (at 0.5 min on the default
            # encoder, 5-8 of a target's 16-20 evaluations were such)
            break
        t_gen = time.perf_counter()
        gen += 1
        rng = np.random.default_rng([rng_seed, gen])
        kids, attempts = [], 0
        while len(kids) < offspring and attempts < 20 * offspring and \
                (max_candidates is None or len(seen) < max_candidates):
            attempts += 1
            m = level_switch(parent, order, times, budget, rng, int(rng.integers(1, 4)))
            if m is not None and m not in seen:
                seen.add(m)
                kids.append(m)
        if not kids:
            break
        bar.update(len(kids))
        low = []
        for k in kids:
            if out_of_time():
                break
            low.append((score(k, fidelities[0], gen), k))
        best, best_loss = None, parent_loss
        for _, k in sorted(low)[:survivors]:
            if out_of_time():
                break
            loss = score(k, top, gen) if top != fidelities[0] else dict((kk, ll) for ll, kk in low)[k]
            if loss < best_loss:
                best, best_loss = k, loss
        if best is not None:
            parent, parent_loss = best, best_loss
            improvements += 1
        last_gen = time.perf_counter() - t_gen
        bar.set_postfix(best=f"{parent_loss:.4g}", seed=f"{seed_loss:.4g}")
    bar.close()
    return SearchResult(choice=list(parent), loss=parent_loss, loss_seed=seed_loss, n_evaluated=n_eval,
                        n_candidates=len(seen), generations=gen, improvements=improvements, history=records)


def repair(choice, times: list[np.ndarray], errors: list[np.ndarray], budget: float) -> list[int]:
    """The plan nearest `choice` within `budget` by the DP's own currency: while the total time is over it, the
    one-group switch to a faster option that costs the least error per second saved; then, while a switch to a
    slower option with a smaller error still fits, the one that saves the most error per second spent. Used when
    a searched plan, timed, missed its target: the measurement moved the budget, the search's architecture is
    kept as far as it fits. times[g], errors[g]: [n_options_g]; returns option indices (choice itself if it fits
    and nothing fits better)."""
    ch = [int(c) for c in choice]
    total = float(sum(times[g][c] for g, c in enumerate(ch)))
    while total > budget:
        best = None                                          # (error per second saved, group, option)
        for g, c in enumerate(ch):
            for o in np.flatnonzero(times[g] < times[g][c]):
                r = (errors[g][o] - errors[g][c]) / (times[g][c] - times[g][o])
                if best is None or r < best[0]:
                    best = (r, g, int(o))
        if best is None:                                     # every group at its fastest: as near as it gets
            break
        _, g, o = best
        total += float(times[g][o] - times[g][ch[g]])
        ch[g] = o
    while True:
        best = None                                          # (error saved per second, group, option)
        for g, c in enumerate(ch):
            for o in np.flatnonzero((times[g] > times[g][c]) & (errors[g] < errors[g][c])):
                if total + times[g][o] - times[g][c] <= budget:
                    r = (errors[g][c] - errors[g][o]) / (times[g][o] - times[g][c])
                    if best is None or r > best[0]:
                        best = (r, g, int(o))
        if best is None:
            return ch
        _, g, o = best
        total += float(times[g][o] - times[g][ch[g]])
        ch[g] = o
