"""JSON round trips, schema checks, atomic writes, the planning glue against the solver."""
import json

import pytest

from planner import io
from planner.errors import PlannerError
from planner.planning import uniform_plan
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
