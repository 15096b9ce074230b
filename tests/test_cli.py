"""The CLI end to end on a tiny model, and every bad input gives one line, exit 2, no partial output."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.cli import main
from planner.types import LatencyProfile, Plan, VerifyReport

from .conftest import make_tiny, target_inside

FAST = ["--rounds", "1", "--batch-size", "2", "--seq-len", "16", "--threads", "1"]


def _ok(args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def _err(args, expect: str):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert expect.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def profiled(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "p.json"
    _ok(["profile", tiny_bert, *FAST, "--out", out, "-q"])
    return out


def test_end_to_end(tiny_bert, profiled, calib_file, heldout_file, tmp_path):
    prof = LatencyProfile.load(profiled)
    assert prof.times("attn").widths == [0, 1, 2, 3, 4]
    assert prof.times("ffn").widths == [0, 32, 64, 96, 128]
    assert prof.base["median"] > 0 and prof.hardware["threads"] == 1
    from planner.stages.profile import NOISE_PAIRS
    noise = prof.base["noise"]                       # the machine's noise: one round's pair plus its own pairs
    assert noise["pairs"] == 1 * 1 * (1 + noise["extra_rounds"]) + NOISE_PAIRS and noise["halfwidth"] >= 0
    assert 0 < prof.floor < prof.base["median"]           # the all-removed model was timed and bounds the speedup
    assert prof.max_speedup() <= prof.base["median"] / prof.floor
    for k in ("attn", "ffn"):                         # the de-noised curve the solver uses: monotone, 0 at removal
        m = prof.times(k).model
        assert m[0] == 0.0 and all(b >= a for a, b in zip(m, m[1:]))
    assert prof.fit["n_mixed"] == 8 and len(prof.fit["variants"]) == 8      # the self-check on mixed architectures
    for v in prof.fit["variants"]:
        assert v["measured"] > 0 and v["predicted"] == pytest.approx(prof.predict(v["layers"]))
    target = target_inside(prof, share=0.8, cap=1.5)
    # the closed loop times a tiny model's plans with noise as large as their savings: test_loop.py and
    # test_search.py check it; here the chain of commands, open loop
    r = _ok(["plan", "--search", 0, tiny_bert, "--profile", profiled, "-x", target, "--calib", calib_file, "--n-calib", 64,
             "--loop-rounds", 0, "--out", tmp_path / "run", "-q"])
    assert "heads/ffn" in r.output
    plan = Plan.load(tmp_path / "run" / f"plan-{target:g}x.json")
    assert plan.predicted_time <= prof.base["median"] / target + 1e-12        # the budget holds
    assert (tmp_path / "run" / "db" / "index.json").exists()
    _ok(["apply", tiny_bert, tmp_path / "run" / f"plan-{target:g}x.json", "--out", tmp_path / "m", "-q"])
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["planner_layers"] == [{"heads": l["heads"], "ffn": l["ffn"]} for l in plan.layers]
    assert cfg["planner"]["target_speedup"] == target
    r = _ok(["verify", tiny_bert, tmp_path / "m", "--text", heldout_file, "--reps", 3, "-b", 2, "-s", 16,
             "--profile", profiled, "--out", tmp_path / "v.json"])
    assert "measured" in r.output and "spearman" in r.output
    rep = VerifyReport.load(tmp_path / "v.json")
    assert rep.sizes["compressed_params"] < rep.sizes["dense_params"]
    assert rep.predicted_speedup == pytest.approx(prof.base["median"] / prof.predict(plan.kept))
    assert rep.interval[0] <= rep.measured_speedup <= rep.interval[1]
    assert -1 <= rep.quality["spearman"] <= 1


def test_help_has_examples():
    assert {"profile", "profiles", "plan", "apply", "verify", "run", "report"} <= set(main.commands)
    for cmd in main.commands:
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0 and "Example" in r.output, cmd


def test_unknown_model_type(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mamba9000"}))
    _err(["profile", d, *FAST, "--out", tmp_path / "p.json"], "unsupported model_type 'mamba9000'")
    assert not (tmp_path / "p.json").exists()


def test_missing_paths(tmp_path, tiny_bert, profiled):
    _err(["profile", tmp_path / "nope", *FAST], "not found")
    _err(["plan", "--search", 0, tiny_bert, "--profile", tmp_path / "nope.json", "-x", 2, "--out", tmp_path / "o"], "not found")
    _err(["verify", tiny_bert, tmp_path / "nope"], "not found")
    d = tmp_path / "noconfig"
    d.mkdir()
    _err(["verify", tiny_bert, d], "no config.json")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_corrupted_profile_and_weights(tmp_path, tiny_bert, calib_file):
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "LatencyProfile", "schema_')
    _err(["plan", "--search", 0, tiny_bert, "--profile", bad, "-x", 2, "--out", tmp_path / "o"], "not valid JSON")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(tiny_bert).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    _err(["verify", tiny_bert, broken], "could not load model")
    assert not (tmp_path / "o").exists()


def test_mismatched_profile(tmp_path, tiny_bert, profiled, calib_file):
    other = make_tiny(tmp_path / "other", hidden=32, heads=2, ffn=64)
    _err(["plan", "--search", 0, other, "--profile", profiled, "-x", 1.2, "--calib", calib_file, "--out", tmp_path / "o"],
         "profile is for architecture")
    d = json.loads(Path(profiled).read_text())
    d["hardware"]["key"] = "some-other-cpu-t64"
    d["hardware"]["name"] = "Some Other CPU"
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(d))
    _err(["plan", "--search", 0, tiny_bert, "--profile", moved, "-x", 1.2, "--calib", calib_file, "--out", tmp_path / "o"],
         "--allow-other-machine")
    assert not (tmp_path / "o").exists()
    # the override works
    _ok(["plan", "--search", 0, tiny_bert, "--profile", moved, "-x", target_inside(LatencyProfile.load(profiled)),
         "--calib", calib_file, "--n-calib", 32,
         "--allow-other-machine", "--out", tmp_path / "o3", "-q"])


def test_unreachable_target(tmp_path, tiny_bert, profiled, calib_file):
    line = _err(["plan", "--search", 0, tiny_bert, "--profile", profiled, "-x", 1000, "--calib", calib_file, "--out", tmp_path / "o"],
                "largest reachable speedup")
    assert "x" in line
    assert not (tmp_path / "o").exists()


def test_slow_guard_out_of_range(tmp_path, tiny_bert, profiled):
    _err(["plan", tiny_bert, "--profile", profiled, "-x", 1.1, "--slow-guard", 2, "--out", tmp_path / "o"],
         "--slow-guard must be in [0, 1]")
    assert not (tmp_path / "o").exists()


def test_empty_calibration(tmp_path, tiny_bert, profiled):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _err(["plan", "--search", 0, tiny_bert, "--profile", profiled, "-x", target_inside(LatencyProfile.load(profiled)),
          "--calib", empty, "--out", tmp_path / "o"], "empty")
    assert not list(tmp_path.rglob("plan-*.json"))


def test_bad_option_values(tiny_bert, tmp_path, profiled):
    line = _err(["profile", tiny_bert, "--batch-size", 0, "--out", tmp_path / "p.json"], "batch-size")
    assert line == "error: --batch-size must be >= 1"
    assert not (tmp_path / "p.json").exists()
    line = _err(["plan", "--search", 0, tiny_bert, "--profile", profiled, "-x", 0.5, "--out", tmp_path / "o"], "> 1")
    assert "0.5" in line or "speedup" in line
    assert not (tmp_path / "o").exists()


def test_profiles_lists_stored_profiles(tmp_path, profiled):
    root = tmp_path / "profiles"
    (root / "m" / "s").mkdir(parents=True)
    (root / "m" / "s" / "p.json").write_text(Path(profiled).read_text())
    (root / "m" / "bad.json").write_text("{not json")
    rows = json.loads(_ok(["profiles", "--root", root, "--json"]).output)
    assert [Path(r["path"]).name for r in rows] == ["bad.json", "p.json"]
    assert "error" in rows[0]
    prof = LatencyProfile.load(profiled)
    good = rows[1]
    assert (good["batch"], good["seq"], good["dtype"], good["threads"]) == (2, 16, "float32", 1)
    assert good["shape"] == prof.shape["key"] and good["check_max_err"] == prof.fit["max_rel_error"]
    text = _ok(["profiles", "--root", root]).output
    assert "unreadable" in text and "b2 x s16" in text
    assert "no profiles" in _ok(["profiles", "--root", tmp_path / "none"]).output
