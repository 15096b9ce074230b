"""An interrupted database build resumes layer by layer and gives the same plan as a clean run."""
import pytest

import planner
from planner.config import PlanConfig, ProfileConfig
from planner.io import read_json
from planner.stages import database

from .conftest import make_tiny, target_inside


def test_interrupted_build_resumes_to_same_plan(tmp_path, calib_file, monkeypatch):
    model = make_tiny(tmp_path / "m", layers=3)
    prof, ppath = planner.profile(model, ProfileConfig(batch_size=2, seq_len=16, rounds=1, threads=1),
                                  out=tmp_path / "p.json", progress=False)
    target = target_inside(prof, share=0.8, cap=1.4)
    # the plan is a function of the database here: the closed loop's timings are test_loop.py's
    cfg = PlanConfig(search=0, loop_rounds=0, targets=(target,), calib_path=str(calib_file), n_calib=64)
    clean = planner.plan(model, ppath, cfg, tmp_path / "clean", progress=False)

    real = database.obs.group_obs
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:                     # layer 1's FFN: layer 0 is done, layer 1 is not
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(database.obs, "group_obs", flaky)
    with pytest.raises(KeyboardInterrupt):
        planner.plan(model, ppath, cfg, tmp_path / "resumed", progress=False)
    idx = read_json(tmp_path / "resumed" / "db" / "index.json")
    assert set(idx["layers"]) == {"0"}          # layer 0 was saved before the interruption
    assert not list((tmp_path / "resumed").glob("plan-*.json"))

    calls["n"] = -100                           # no more failures; count the work the resume does
    resumed = planner.plan(model, ppath, cfg, tmp_path / "resumed", progress=False)
    assert calls["n"] == -100 + 4               # only layers 1 and 2 (2 kinds each) were computed again
    assert [p.kept for p in resumed] == [p.kept for p in clean]
    assert resumed[0].total_error == pytest.approx(clean[0].total_error, rel=1e-9)

    # a rerun with the database complete does no OBS at all
    calls["n"] = 0
    planner.plan(model, ppath, cfg, tmp_path / "resumed", progress=False)
    assert calls["n"] == 0
