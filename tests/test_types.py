"""JSON round trips, schema checks, atomic writes, the planning glue against the solver."""
import json

import pytest

from planner import io
from planner.errors import PlannerError
from planner.stages.plan import uniform_plan
from planner.types import LatencyProfile, Plan


def _profile(**over) -> LatencyProfile:
    d = dict(hardware={"device": "cpu", "name": "x", "key": "x-t2", "threads": 2, "torch": "t", "transformers": "t"},
             shape={"family": "bert", "hidden": 64, "n_layers": 2, "n_heads": 4, "head_dim": 16, "ffn": 128,
                    "vocab": 100, "key": "k"},
             batch_size=8, seq_len=16, dtype="float32", mode="prefill", method="model",
             base={"median": 10.0, "spread": 0.1, "reps": 3}, constant=2.0,
             modules={"attn": {"widths": [0, 1, 2, 3, 4], "median": [0, 0.5, 1.0, 1.4, 2.0], "spread": [0] * 5},
                      "ffn": {"widths": [0, 64, 128], "median": [0, 1.0, 2.0], "spread": [0] * 3}},
             created="now")
    d.update(over)
    return LatencyProfile(**d)


def test_profile_roundtrip_and_predict(tmp_path):
    p = _profile()
    path = p.save(tmp_path / "p.json")
    q = LatencyProfile.load(path)
    assert q == p
    assert path.read_text() == io.dumps(p.to_dict())            # deterministic
    assert q.predict([{"heads": 4, "ffn": 128}] * 2) == pytest.approx(10.0)
    assert q.max_speedup() == pytest.approx(10.0 / 2.0)


def test_monotone_view():
    p = _profile(modules={"attn": {"widths": [0, 1, 2], "median": [0, 3.0, 2.0], "spread": [0] * 3},
                          "ffn": {"widths": [0, 1], "median": [0, 1.0], "spread": [0, 0]}})
    assert p.times("attn").monotone == [0, 2.0, 2.0]


def test_schema_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlannerError, match="not valid JSON"):
        LatencyProfile.load(tmp_path / "bad.json")
    d = _profile().to_dict()
    d["schema_version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(d))
    with pytest.raises(PlannerError, match="schema version"):
        LatencyProfile.load(tmp_path / "v.json")
    (tmp_path / "plan.json").write_text(json.dumps(d))
    with pytest.raises(PlannerError, match="expected a Plan"):
        Plan.load(tmp_path / "v.json")
    with pytest.raises(PlannerError, match="not found"):
        LatencyProfile.load(tmp_path / "missing.json")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "f.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_uniform_plan_meets_target():
    p = _profile()
    u = uniform_plan(p, 1.5, 2)
    assert u.predicted_speedup >= 1.5
    assert len({(l["heads"], l["ffn"]) for l in u.layers}) == 1


def test_timed_floor_bounds_the_reachable_speedup():
    assert _profile(constant=0.0).max_speedup() == float("inf")           # nothing bounds it but the floor
    assert _profile(constant=0.0, floor=0.5).max_speedup() == pytest.approx(10.0 / 0.5)
    assert _profile(floor=0.5).max_speedup() == pytest.approx(10.0 / 2.0)  # the constant is the larger bound
    from planner.api import profile_summary
    assert profile_summary(_profile(constant=0.0))["max_speedup"] is None  # JSON has no infinity


def test_uniform_plan_never_removes_everything():
    # constant 0: removing every module would "predict" zero time; that is unreachable, not a division by zero
    p = _profile(constant=0.0)
    assert uniform_plan(p, 4.0, 2).predicted_speedup >= 4.0
    with pytest.raises(PlannerError, match="not reachable by uniform pruning"):
        uniform_plan(p, 1e6, 2)


def test_uniform_plan_priced_at_the_timed_floor():
    # constant 0, a timed floor, and module times that only fall at width 0: removing everything is the one
    # uniform plan that reaches 5x, priced at the floor (10 / 0.5), as max_speedup prices the DP's reach
    flat = {"attn": {"widths": [0, 1, 2, 3, 4], "median": [0, 2.0, 2.0, 2.0, 2.0], "spread": [0] * 5},
            "ffn": {"widths": [0, 64, 128], "median": [0, 2.0, 2.0], "spread": [0] * 3}}
    p = _profile(constant=0.0, floor=0.5, modules=flat)
    u = uniform_plan(p, 5.0, 2)
    assert {(l["heads"], l["ffn"]) for l in u.layers} == {(0, 0)}
    assert u.predicted_speedup == pytest.approx(p.max_speedup()) == pytest.approx(20.0)
    assert p.predict(u.layers) == pytest.approx(0.5)                 # what verify predicts for it: not 0 s


def test_model_curve_is_the_solvers_view():
    p = _profile(modules={"attn": {"widths": [0, 1, 2], "median": [0, 3.0, 2.0], "spread": [0] * 3,
                                   "model": [0, 2.4, 2.5]},
                          "ffn": {"widths": [0, 1], "median": [0, 1.0], "spread": [0, 0]}})
    assert p.times("attn").monotone == [0, 2.4, 2.5]
    assert p.times("attn").time_at(1) == 2.4 and p.times("attn").time_at(1, monotone=False) == 3.0


def _mixed_truth(p, archs, offset, scale):
    """Measured times of `archs` if the truth were offset + scale * the additive model."""
    return [offset + scale * p.predict(a) for a in archs]


def test_profile_fit_folds_in_a_correction_that_helps():
    from planner.stages.profile import _fit
    p = _profile(constant=2.0)
    archs = [[{"heads": h, "ffn": f}] * 2 for h, f in [(1, 0), (2, 64), (3, 64), (0, 128), (4, 0)]]
    measured = _mixed_truth(p, archs, 1.0, 0.9)          # passes through the dense point (10 s, 10 s)
    q = _fit(p, archs, measured)
    assert q.fit["applied"] and q.fit["scale"] == pytest.approx(0.9, rel=0.02)
    assert q.fit["max_rel_error"] < 0.01 < q.fit["max_rel_error_additive"]
    for a, m in zip(archs, measured):
        assert q.predict(a) == pytest.approx(m, rel=0.01)           # folded into modules and constant
    assert LatencyProfile.from_dict(q.to_dict()) == q


def test_profile_fit_rejected_when_it_does_not_help():
    from planner.stages.profile import _fit
    p = _profile(constant=2.0)
    archs = [[{"heads": h, "ffn": f}] * 2 for h, f in [(1, 0), (2, 64), (3, 64), (0, 128)]]
    measured = [p.predict(a) * (1 + e) for a, e in zip(archs, [0.03, -0.03, 0.03, -0.03])]   # pure noise
    q = _fit(p, archs, measured)
    assert not q.fit["applied"]
    assert q.modules == p.modules and q.constant == p.constant
    assert q.fit["max_rel_error"] == pytest.approx(1 / 0.97 - 1, rel=1e-9)


def test_profile_fit_never_applies_a_negative_scale():
    # timings drowned by another process can "fit" a decreasing line; folding it in would make keeping more
    # neurons look faster (a non-monotone solver curve), so such a correction is rejected outright
    from planner.stages.profile import _fit
    p = _profile(constant=2.0)
    archs = [[{"heads": h, "ffn": f}] * 2 for h, f in [(1, 0), (2, 64), (3, 64), (0, 128), (4, 0)]]
    measured = _mixed_truth(p, archs, 20.0, -1.0)        # passes through the dense point: 20 - 10 = 10
    q = _fit(p, archs, measured)
    assert q.fit["scale"] < 0 and not q.fit["applied"]
    for k in ("attn", "ffn"):
        m = q.times(k).monotone
        assert all(b >= a for a, b in zip(m, m[1:]))
