"""`planner plan --distributed`: 2 gloo processes under torchrun build the same database and the same plans as one."""
import json
import os
import subprocess
import sys

import pytest
import torch

from planner.stages.database import Database
from planner.stages.distributed import Group
from planner.types import LatencyProfile, Plan

from .conftest import make_tiny, steady_profile, target_inside
from .test_cli import FAST, _err, _ok


def test_blocks_are_split_contiguously_and_cover_the_model():
    for n, world in [(5, 2), (4, 2), (3, 4), (32, 3)]:
        got = [list(Group(r, world, "cpu").blocks(n)) for r in range(world)]
        assert [i for g in got for i in g] == list(range(n))                  # every block once, in order
        assert max(map(len, got)) - min(map(len, got)) <= 1


def test_distributed_outside_torchrun_is_one_line(tmp_path, calib_file, monkeypatch):
    m = make_tiny(tmp_path / "m", layers=2)
    prof = tmp_path / "p.json"
    _ok(["profile", m, *FAST, "--out", prof, "-q"])
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    line = _err(["plan", m, "--profile", prof, "-x", 1.01, "--calib", calib_file, "--distributed", "--search", 0,
                 "--out", tmp_path / "run"], "runs under torchrun")
    assert "--nproc-per-node" in line                                   # says how to start it
    assert not (tmp_path / "run").exists()                              # nothing built, nothing half-written


def _plan(cmd_prefix, m, prof, target, calib, out, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}             # torchrun's per-process default, for both runs
    cmd = [*cmd_prefix, "-m", "planner.cli", "plan", str(m), "--profile", str(prof), "-x", f"{target:g}", "--calib",
           str(calib), "--n-calib", "64", "--search", "0", "--loop-rounds", "0", "--out", str(out), "-q", *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_two_gloo_processes_build_the_one_process_database(tmp_path, calib_file):
    m = make_tiny(tmp_path / "m", layers=5)                  # 5 blocks: ranks of 3 and 2
    prof = tmp_path / "p.json"
    _ok(["profile", m, *FAST, "--out", prof, "-q"])
    # the subject is the database, not the timer: a busy machine once left this profile 1.012x of reach
    _, prof = steady_profile(LatencyProfile.load(prof), tmp_path / "steady.json")
    target = target_inside(LatencyProfile.load(prof), share=0.6, cap=1.5)
    _plan([sys.executable], m, prof, target, calib_file, tmp_path / "one")
    r = _plan([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], m, prof,
              target, calib_file, tmp_path / "two", ["--distributed"])
    assert r.stdout.count("plans written to") == 1                              # rank 0 reports, rank 1 is quiet
    a, b = Database(tmp_path / "one" / "db"), Database(tmp_path / "two" / "db")
    assert a.n_layers == b.n_layers == 5 and sorted(b.index["layers"], key=int) == [str(i) for i in range(5)]
    assert not list((tmp_path / "two" / "db").glob("*.entry.json"))              # merged into the index
    assert b.index["ranks"] == {"0": 0, "1": 0, "2": 0, "3": 1, "4": 1}           # both processes built blocks
    for i in range(5):
        for kind in ("attn", "ffn"):
            ea, eb = a.entry(i, kind), b.entry(i, kind)
            assert ea["widths"] == eb["widths"] and ea["tokens_val"] == eb["tokens_val"]
            for key in ("val_error", "train_loss"):
                torch.testing.assert_close(torch.tensor(eb[key]), torch.tensor(ea[key]), rtol=1e-4, atol=1e-9)
        for k, t in a.tensors(i).items():
            if k.endswith(".order"):
                assert torch.equal(t, b.tensors(i)[k]), (i, k)
            else:
                torch.testing.assert_close(b.tensors(i)[k], t, rtol=1e-5, atol=1e-7)
    pa = Plan.load(tmp_path / "one" / f"plan-{target:g}x.json")
    pb = Plan.load(tmp_path / "two" / f"plan-{target:g}x.json")
    assert pa.layers == pb.layers and json.dumps(pa.layers) == json.dumps(pb.layers)
    assert pa.total_error == pytest.approx(pb.total_error, rel=1e-4)
