"""SPDY search: never worse than the plain DP on its loss, finds better plans where they exist, resumes to
the same sequence, and is wired into `planner plan --search`."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

import planner
from planner.algorithms.search import search
from planner.algorithms.solver import solve
from planner.cli import main
from planner.config import PlanConfig, ProfileConfig


def _toy(seed=0, G=6, n_opt=5):
    """A DP instance whose reported errors are mis-scaled against a hidden true loss: the search's job."""
    rng = np.random.default_rng(seed)
    times = [np.sort(rng.uniform(0, 1, n_opt)) for _ in range(G)]
    errors = [np.sort(rng.uniform(0, 1, n_opt))[::-1].copy() for _ in range(G)]
    true_w = rng.uniform(0.1, 5.0, G)                      # how much each group really matters
    budget = 0.5 * sum(t.max() for t in times)

    def solve_c(c):
        return solve(times, [e * ci for e, ci in zip(errors, c)], [budget], n_buckets=500)[0].choices

    def loss(key):
        return float(sum(w * e[o] for w, e, o in zip(true_w, errors, key)))
    return solve_c, loss, G


@pytest.mark.parametrize("seed", range(5))
def test_never_worse_than_plain_dp_and_usually_better(seed):
    solve_c, loss, G = _toy(seed)
    res = search(G, solve_c, loss, n=40, seed=seed, progress=False)
    assert res.loss_dp == pytest.approx(loss(solve_c(np.ones(G))))
    assert res.loss <= res.loss_dp
    assert res.loss == pytest.approx(min(h["loss"] for h in res.history))
    assert res.loss == pytest.approx(loss(solve_c(np.asarray(res.coefs))))   # the coefficients reproduce it


def test_search_improves_on_misweighted_errors():
    gains = []
    for seed in range(5):
        solve_c, loss, G = _toy(seed)
        r = search(G, solve_c, loss, n=40, seed=seed, progress=False)
        gains.append(r.loss < r.loss_dp - 1e-12)
    assert sum(gains) >= 3


def test_resume_replays_to_the_same_result(tmp_path):
    solve_c, loss, G = _toy(3)
    full = search(G, solve_c, loss, n=30, seed=1, progress=False)
    assert full.n_evaluated >= 4
    calls = {"n": 0}

    def flaky(key):
        calls["n"] += 1
        if calls["n"] == full.n_evaluated // 2 + 1:
            raise KeyboardInterrupt
        return loss(key)
    kept = []                                                # what the caller stores for a resume
    with pytest.raises(KeyboardInterrupt):
        search(G, solve_c, flaky, n=30, seed=1, progress=False, on_candidate=kept.append)
    assert 0 < len(kept) < 30
    counted = {"n": 0}

    def counting(key):
        counted["n"] += 1
        return loss(key)
    resumed = search(G, solve_c, counting, n=30, seed=1, progress=False, history=json.loads(json.dumps(kept)))
    assert resumed.history == full.history and resumed.coefs == full.coefs
    assert counted["n"] < full.n_evaluated                  # the finished part was not scored again


def test_plan_with_search_on_tiny_model(tiny_bert, calib_file, tmp_path):
    prof, ppath = planner.profile(tiny_bert, ProfileConfig(batch_size=4, seq_len=32, rounds=1, threads=1, n_mixed=0),
                                  out=tmp_path / "p.json", progress=False)
    t = round(min(1.5, 0.7 * prof.max_speedup()), 2)
    base = PlanConfig(targets=(t,), calib_path=str(calib_file), n_calib=64, loop_rounds=0)   # the search alone
    plain = planner.plan(tiny_bert, ppath, base, tmp_path / "plain", progress=False)[0]
    r = CliRunner().invoke(main, ["plan", str(tiny_bert), "--profile", str(ppath), "-x", str(t), "--calib",
                                  str(calib_file), "--n-calib", "64", "--search", "12", "--loop-rounds", "0",
                                  "--out", str(tmp_path / "s"),
                                  "-q", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)[0]
    rec = p["options"]["search"]
    assert rec["candidates"] == 12 and rec["loss"] <= rec["loss_dp"]
    assert rec["total_error_dp"] == pytest.approx(plain.total_error)
    assert p["predicted_time"] <= prof.base["median"] / t + 1e-12                 # still within the budget
    assert (tmp_path / "s" / "search" / f"search-{t:g}x.json").exists()
    out, _ = planner.apply(tiny_bert, tmp_path / "s" / f"plan-{t:g}x.json", tmp_path / "m", progress=False)
    assert (out / "config.json").exists()


def test_search_and_closed_loop_together(tiny_bert, calib_file, tmp_path):
    """The loop re-solves a searched plan with the search's coefficients: both records end up in the plan."""
    prof, ppath = planner.profile(tiny_bert, ProfileConfig(batch_size=4, seq_len=32, rounds=1, threads=1, n_mixed=0),
                                  out=tmp_path / "p.json", progress=False)
    t = max(1.01, round(1 + 0.4 * (prof.max_speedup() - 1), 2))
    [p] = planner.plan(tiny_bert, ppath, PlanConfig(targets=(t,), calib_path=str(calib_file), n_calib=64, search=4,
                                                    loop_rounds=2), tmp_path / "s", progress=False)
    loop = p.options["closed_loop"]
    assert p.options["search"]["candidates"] == 4 and 1 <= len(loop["rounds"]) <= 2
    assert loop["measured"] == loop["rounds"][loop["chosen"]]["measured"] > 0
    assert loop["interval"][0] <= loop["measured"] <= loop["interval"][1]
