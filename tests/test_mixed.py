"""Mixed plans: structured widths and sparse levels offered to one DP, end to end on a tiny model.

The tiny model's sparse timings are noise, so the profile's sparse times are set by hand (cheap, so the DP
has a reason to pick them); everything else (database, SparseGPT weights, apply, save, load) is real."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import transformers

import planner
from planner.algorithms.solver import solve
from planner.config import PlanConfig, ProfileConfig
from planner.stages.database import Database
from planner.stages.plan import options

from .conftest import steady_profile
from .test_solver import brute_force


@pytest.fixture(scope="module")
def mixed_run(tiny_bert, calib_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    prof, _ = planner.profile(tiny_bert, ProfileConfig(batch_size=4, seq_len=32, rounds=1, threads=1, n_mixed=0,
                                                       sparsity=(0.5, 0.9)), out=tmp / "real.json", progress=False)
    # module times at fixed shares of the timed dense model: on a busy machine the tiny FFN's own timing once left
    # it so small a share that the target below came out 1.0x (CI run 8)
    prof, _ = steady_profile(prof, tmp / "steady.json")
    dense = {k: prof.times(k).monotone[-1] for k in ("attn", "ffn")}
    # sparse FFN almost free (1% / 0.5% of dense: far cheaper than keeping 32 of 128 neurons, less error than
    # removing the FFN), sparse attention slower than dense: under a tight budget the DP has every reason to
    # take the one and never the other
    sp = {"ffn": {"levels": [0.5, 0.9], "kernels": ["csr"] * 2, "median": [0.01 * dense["ffn"], 0.005 * dense["ffn"]],
                  "spread": [0.0, 0.0]},
          "attn": {"levels": [0.5, 0.9], "kernels": ["csr"] * 2, "median": [1.3 * dense["attn"]] * 2,
                   "spread": [0.0, 0.0]}}
    # and no structured option saves anything but removing the FFN: attention costs its dense time at every
    # width, a kept FFN neuron count its dense time. A target that needs half the FFN time back then leaves the DP
    # two ways per layer, removal or the (less lossy) sparse level
    mods = {"attn": {**prof.modules["attn"], "model": [dense["attn"]] * len(prof.modules["attn"]["widths"])},
            "ffn": {**prof.modules["ffn"], "model": [0.0] + [dense["ffn"]] * (len(prof.modules["ffn"]["widths"]) - 1)}}
    prof = dataclasses.replace(prof, sparse=sp, modules=mods, floor=0.0)
    ppath = prof.save(tmp / "p.json")
    L, base = prof.arch.n_layers, prof.base["median"]
    target = math.floor(100 * base / (base - 0.5 * L * dense["ffn"])) / 100
    plans = planner.plan(tiny_bert, ppath, PlanConfig(search=0, loop_rounds=0, targets=(target,), calib_path=str(calib_file),
                                                      n_calib=64),
                         tmp / "run", progress=False)
    return tmp, prof, ppath, plans[0]


def test_database_scores_sparse_levels(mixed_run):
    tmp, prof, _, plan = mixed_run
    db = Database(tmp / "run" / "db")
    assert db.index["levels"]["sparse"] == [0.5, 0.9]
    for l in range(db.n_layers):
        for kind in ("attn", "ffn"):
            e = db.sparse_errors(l, kind)
            assert set(e) == {0.5, 0.9} and 0 < e[0.5] < e[0.9]      # more sparsity, more error
            n = 4 if kind == "attn" else 2
            Hs = db.slot_hessians(l, kind, n)
            assert torch.equal(Hs[-1], db.hessian(l, kind)) and db.tensors(l)[f"{kind}.H"].ndim == 1   # packed
            if kind == "attn":
                # q, k and v read one tensor: one Hessian stored for the three, and it is their input's
                assert db.entry(l, kind)["slot_alias"] == {"1": 0, "2": 0}
                assert {k for k in db.tensors(l) if k.startswith("attn.H_slot")} == {"attn.H_slot0"}
                assert torch.equal(Hs[0], Hs[1]) and torch.equal(Hs[0], Hs[2])
                assert torch.allclose(Hs[0], Hs[0].T) and float(torch.linalg.eigvalsh(Hs[0]).min()) > -1e-6


def test_dp_over_mixed_options_is_exact(mixed_run):
    tmp, prof, _, plan = mixed_run
    db = Database(tmp / "run" / "db")
    groups, widths, levels, times, errors = options(db, prof, "residual")
    assert all(len(set(zip(w, lv))) == len(w) for w, lv in zip(widths, levels))     # no option listed twice
    assert any((lv > 0).any() for lv in levels)
    budget = prof.base["median"] / plan.target_speedup - prof.constant
    # the plan's own resolution: a coarser table is (rightly) more conservative, and where the budget's slack
    # is within a bucket of a better plan (0.01x of a dense FFN here) it picks a worse one than the plan did
    n_buckets = plan.options["n_buckets"]
    sol = solve(times, errors, [budget], n_buckets=n_buckets)[0]
    bucket = budget / n_buckets
    rounded = [np.ceil(np.asarray(t) / bucket) for t in times]
    best, _ = brute_force(rounded, errors, math.floor(budget / bucket))
    assert sol.error == pytest.approx(best, abs=1e-12)
    assert sol.error == pytest.approx(plan.total_error, rel=1e-9)


def test_sparse_choice_is_applied_saved_and_predicted(mixed_run, tiny_bert):
    tmp, prof, ppath, plan = mixed_run
    chosen = [l.get("ffn_sparsity") for l in plan.layers]
    assert any(chosen), "with FFN sparsity this cheap the DP should pick it somewhere"
    assert not any(l.get("attn_sparsity") for l in plan.layers)   # slower than dense: never chosen
    out, model = planner.apply(tiny_bert, plan, tmp / "m", progress=False)
    adapter = planner.adapters.checkpoint.load_model(out)[1]
    assert [s.to_dict() for s in adapter.spec(model)] == plan.kept
    assert prof.predict(plan.kept) == pytest.approx(plan.predicted_time, rel=1e-9)
    m2 = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    for i, lv in enumerate(chosen):
        lin = m2.encoder.layer[i].output.dense
        if lv:
            assert type(lin).__name__ == "PlannerCsrLinear" and lin.sparsity == lv
            w = lin.weight
            assert float((w == 0).sum()) / w.numel() >= lv - 0.01
    x = {"input_ids": torch.randint(5, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(m2(**x).last_hidden_state, model(**x).last_hidden_state, rtol=1e-4, atol=1e-5)
    rep = planner.verify(tiny_bert, out, planner.VerifyConfig(batch_size=4, seq_len=32, reps=3, n_text=16),
                         profile_path=ppath, progress=False)
    assert rep.predicted_speedup == pytest.approx(prof.base["median"] / plan.predicted_time, rel=1e-9)


def test_structured_only_when_asked(mixed_run, tiny_bert, calib_file):
    tmp, prof, ppath, plan = mixed_run
    plans = planner.plan(tiny_bert, ppath, PlanConfig(search=0, targets=(plan.target_speedup,), calib_path=str(calib_file),
                                                      n_calib=64, sparse=False), tmp / "run-structured",
                         progress=False)
    assert not any(k.endswith("_sparsity") for l in plans[0].layers for k in l)
    assert "sparse" not in Database(tmp / "run-structured" / "db").index["levels"]
    assert plans[0].total_error >= plan.total_error - 1e-12         # more options never hurt the DP


def test_sparse_only_keeps_the_architecture(mixed_run, tiny_bert, calib_file):
    """--sparse-only: every module at its full width, speed from sparse levels alone; the DP is still exact over
    that smaller option set, and a target beyond what sparsity alone reaches is refused in one line."""
    tmp, prof, ppath, plan = mixed_run
    db = Database(tmp / "run" / "db")
    groups, widths, levels, times, errors = options(db, prof, "residual", structured=False)
    full = {"attn": prof.arch.attn_units, "ffn": prof.arch.ffn}
    assert all(set(w.tolist()) == {full[k]} for (l, k), w in zip(groups, widths))
    assert all(len(lv) == 3 for (l, k), lv in zip(groups, levels))           # dense, 0.5, 0.9
    # the sparse FFN costs ~1% of dense, attention never gets faster: reachable is ~ base / (base - FFN share)
    ceiling = prof.base["median"] / (prof.constant + sum(min(t) for t in times))
    target = round(1 + 0.6 * (ceiling - 1), 3)
    cfg = PlanConfig(search=0, loop_rounds=0, targets=(target,), calib_path=str(calib_file), n_calib=64, structured=False)
    p = planner.plan(tiny_bert, ppath, cfg, tmp / "run", progress=False, db_dir=tmp / "run" / "db")[0]
    assert [(l["heads"], l["ffn"]) for l in p.layers] == [(full["attn"], full["ffn"])] * len(p.layers)
    assert any(l.get("ffn_sparsity") for l in p.layers) and p.predicted_speedup >= target - 1e-9
    assert p.options["structured"] is False
    budget = prof.base["median"] / target - prof.constant
    sol = solve(times, errors, [budget], n_buckets=2000)[0]
    bucket = budget / 2000
    best, _ = brute_force([np.ceil(np.asarray(t) / bucket) for t in times], errors, math.floor(budget / bucket))
    assert sol.error == pytest.approx(best, abs=1e-12)
    with pytest.raises(planner.errors.UnreachableTarget, match="by sparse levels alone"):
        planner.plan(tiny_bert, ppath, dataclasses.replace(cfg, targets=(round(ceiling * 1.05, 2),)), tmp / "run",
                     progress=False, db_dir=tmp / "run" / "db")
    with pytest.raises(planner.errors.PlannerError, match="--sparse-only needs"):
        PlanConfig(search=0, structured=False, sparse=False)
    plain = dataclasses.replace(prof, sparse={}).save(tmp / "no-sparse.json")
    with pytest.raises(planner.errors.PlannerError, match="--sparse-only needs a profile with sparse levels"):
        planner.plan(tiny_bert, plain, cfg, tmp / "never", progress=False)
    assert not (tmp / "never").exists()                               # refused before any work


def test_sparse_times_never_grow_with_sparsity():
    from planner.stages.profile import sparse_model
    # CSR: 0.9 timed faster than 0.95 (noise) -> pooled to their mean; 2:4 is its own kernel, left alone
    got = sparse_model([0.5, 0.9, 0.95, 0.5], ["csr", "csr", "csr", "2:4"], [3.0, 1.0, 1.4, 5.0])
    assert got == pytest.approx([3.0, 1.2, 1.2, 5.0])
    assert sparse_model([0.95, 0.5], ["csr", "csr"], [1.0, 3.0]) == [1.0, 3.0]       # already monotone, any order
