"""The report: artefacts found by kind, figures that carry the run's numbers, a page that renders in a real
headless browser with every image loaded, and bad input that fails cleanly without leaving output."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from planner import progress
from planner.cli import main
from planner.errors import PlannerError
from planner.reporting import html as report
from planner.reporting import plots
from planner.types import LatencyProfile

RUN = ["-b", "8", "-s", "128", "--rounds", "1", "--threads", "1", "--n-calib", "64"]


def _ok(args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def run_dir(tiny_bert, calib_file, tmp_path_factory):
    """A real `planner run` on the tiny model: profile, 2 targets, planner + baseline, verify, report."""
    out = tmp_path_factory.mktemp("run") / "r"
    _ok(["run", "--search", 0, tiny_bert, "-x", 1.2, "-x", 1.4, "--out", out, "--calib", calib_file, *RUN,
         "--recover-minutes", 0.03, "--recover-data", calib_file, "--recover-eval-every", 5, "-q"])
    return out


def test_run_writes_report_and_resumes(run_dir, tiny_bert, calib_file):
    index = run_dir / "report" / "index.html"
    assert index.exists()
    a = report.collect(run_dir)
    assert len(a.profiles) == 1 and len(a.plans) == 4 and len(a.reports) == 6
    assert sorted((m, t) for _, m, t, _ in a.reports) == sorted(
        [("planner", 1.2), ("planner", 1.4), ("magnitude-uniform", 1.2), ("magnitude-uniform", 1.4),
         ("planner+recovery", 1.2), ("planner+recovery", 1.4)])
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert sorted(r["method"] for r in rows) == ["magnitude-uniform"] * 2 + ["planner"] * 2 + ["planner+recovery"] * 2
    for t in (1.2, 1.4):                              # the recovered model has the one-shot model's architecture
        one = json.loads((run_dir / "models" / f"planner-{t:g}x" / "config.json").read_text())
        rec = json.loads((run_dir / "models" / f"recovered-{t:g}x" / "config.json").read_text())
        assert one["planner_layers"] == rec["planner_layers"] and "recover" in rec["planner"]
    # a rerun finds everything in place and redoes nothing but the table and the report
    r = _ok(["run", "--search", 0, tiny_bert, "-x", 1.2, "-x", 1.4, "--out", run_dir, "--calib", calib_file, *RUN,
             "--recover-minutes", 0.03, "--recover-data", calib_file, "--recover-eval-every", 5])
    assert "reusing" in r.output and r.output.count("written") == 0


def test_report_page_carries_the_numbers(run_dir, tmp_path):
    index = report.write(run_dir, tmp_path / "rep")
    page = index.read_text()
    a = report.collect(run_dir)
    for _, m, t, r in a.reports:                  # every verify row: measured speedup, its interval, quality
        assert f"{r.measured_speedup:.2f}x" in page and f"{r.quality['spearman']:.3f}" in page
        assert f"[{r.interval[0]:.3f}, {r.interval[1]:.3f}]" in page
    for _, p in a.plans:                          # every closed-loop round of every plan, with its interval
        for rnd in p.options["closed_loop"].get("rounds", []):
            assert f"{rnd['measured']:.3f}x" in page and f"[{rnd['lo']:.3f}, {rnd['hi']:.3f}]" in page
    prof = a.profiles[0][1]
    assert prof.hardware["name"] in page and f"batch {prof.batch_size} × seq {prof.seq_len}" in page
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert sorted(srcs) == sorted(["latency.png", "self-check.png", "plans.png", "frontier.png",
                                   "predicted-vs-measured.png"])
    for s in srcs:                                # each is a real, non-blank PNG
        img = imread(index.parent / s)
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0.01
    for p in a.plans:                             # the per-layer table has every plan's widths
        assert f"{p[1].layers[0]['heads']} / {p[1].layers[0]['ffn']}" in page
    assert not [p for p in index.parent.parent.iterdir() if p.name.startswith(".")]   # no temporary left


def test_figures_plot_the_artefacts(run_dir):
    a = report.collect(run_dir)
    prof = a.profiles[0][1]
    ax_attn, ax_ffn = plots.latency_curves(prof).axes
    for ax, kind in ((ax_attn, "attn"), (ax_ffn, "ffn")):
        line = ax.get_lines()[-1]                  # the solver's curve
        np.testing.assert_allclose(line.get_xdata(), prof.times(kind).widths)
        np.testing.assert_allclose(line.get_ydata(), np.asarray(prof.times(kind).monotone) * 1e3)
    plans = [p for _, p in a.plans]
    own = sorted([p for p in plans if p.method == "planner"], key=lambda p: p.target_speedup)
    ax_h, ax_f = plots.plan_widths(plans).axes
    heights = [round(b.get_height()) for b in ax_h.patches]
    assert heights == [l["heads"] for p in own for l in p.layers]
    assert [round(b.get_height()) for b in ax_f.patches] == [l["ffn"] for p in own for l in p.layers]
    fr = plots.frontier(a.rows())
    planner_line = [l for l in fr.axes[0].get_lines() if l.get_label() == "planner"][0]
    np.testing.assert_allclose(planner_line.get_xdata(), [r.measured_speedup for m, _, r in a.rows() if m == "planner"])
    pv = plots.predicted_vs_measured(a.rows())
    pts = [l for l in pv.axes[0].get_lines() if l.get_label() == "magnitude-uniform"][0]
    np.testing.assert_allclose(pts.get_ydata(), [r.predicted_speedup for m, _, r in a.rows()
                                                 if m == "magnitude-uniform"])


def test_collect_bad_input(tmp_path, run_dir):
    with pytest.raises(PlannerError, match="not found"):
        report.collect(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other.json").write_text('{"kind": "Something"}')
    with pytest.raises(PlannerError, match="no planner artefacts"):
        report.collect(tmp_path / "empty")
    bad = tmp_path / "bad"
    shutil.copytree(run_dir / "verify", bad)
    (bad / "planner-1.4x.json").write_text('{"kind": "VerifyReport", "schema_')
    with pytest.raises(PlannerError, match="planner-1.4x.json is not valid JSON"):
        report.collect(bad)
    # a report written before reports recorded their plan: method and target come from the file name
    old = tmp_path / "old"
    old.mkdir()
    d = json.loads((run_dir / "verify" / "planner-1.4x.json").read_text())
    d.pop("plan")
    d["compressed"] = str(tmp_path / "gone")
    (old / "planner-1.4x.json").write_text(json.dumps(d))
    assert [(m, t) for _, m, t, _ in report.collect(old).reports] == [("planner", 1.4)]


def test_cli_report_errors_leave_nothing(tmp_path, run_dir, monkeypatch):
    r = CliRunner().invoke(main, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith("error: run directory not found")
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    out = _ok(["report", run_dir, "--out", tmp_path / "o", "--json"])
    assert json.loads(out.output)["index"] == str(tmp_path / "o" / "index.html")
    # a failure while drawing leaves the previous report as it was and no temporary directory behind
    before = (tmp_path / "o" / "index.html").read_text()
    monkeypatch.setattr(plots, "frontier", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        report.write(run_dir, tmp_path / "o")
    assert (tmp_path / "o" / "index.html").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# ---------------------------------------------------------------- in a real headless browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("PLANNER_REQUIRE_BROWSER"),
    reason="no chromium on PATH (Debian: apt-get install chromium); the README's test command installs it")


def _chromium(url: str, tmp: Path, *args) -> subprocess.CompletedProcess:
    assert CHROMIUM, "PLANNER_REQUIRE_BROWSER is set but no chromium is installed"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0"]
    return subprocess.run([CHROMIUM, *flags, *args, url], capture_output=True, text=True, timeout=120)


def _body(dom: str) -> dict:
    m = re.search(r"<body([^>]*)>", dom)
    assert m, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1)))


@needs_browser
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    index = report.write(run_dir, tmp_path / "rep")
    n_img = len(re.findall(r"<img ", index.read_text()))
    res = _chromium(index.as_uri(), tmp_path, "--virtual-time-budget=5000", "--dump-dom")
    body = _body(res.stdout)
    assert body.get("data-ready") == "1", "the page's load handler did not run"
    assert body["data-images"] == str(n_img) and body["data-broken-images"] == "0"
    assert 'class="bad"' not in res.stdout                          # no warning was inserted
    js_errors = [l for l in res.stderr.splitlines() if "CONSOLE" in l and ("Uncaught" in l or "Error" in l)]
    assert not js_errors, js_errors
    shot = tmp_path / "shot.png"
    _chromium(index.as_uri(), tmp_path, "--window-size=1200,2400", f"--screenshot={shot}")
    img = imread(shot)
    assert img.shape[:2] == (2400, 1200) and img.std() > 0.05       # something was drawn, not a blank page

    # the check can fail: a missing image is counted and said on the page
    (index.parent / "frontier.png").unlink()
    res = _chromium(index.as_uri(), tmp_path, "--virtual-time-budget=5000", "--dump-dom")
    assert _body(res.stdout)["data-broken-images"] == "1"
    assert '<p class="bad">image failed to load: frontier.png</p>' in res.stdout


# ---------------------------------------------------------------- progress and --json

def test_progress_quiet_when_not_interactive(monkeypatch):
    class Tty:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.delenv("PLANNER_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr", Tty(True))
    assert progress.enabled(True) and not progress.enabled(False)
    monkeypatch.setattr("sys.stderr", Tty(False))
    assert not progress.enabled(True)
    monkeypatch.setenv("PLANNER_PROGRESS", "1")
    assert progress.enabled(True) and not progress.enabled(False)     # --quiet still wins
    monkeypatch.setenv("PLANNER_PROGRESS", "0")
    monkeypatch.setattr("sys.stderr", Tty(True))
    assert not progress.enabled(True)
    assert progress.bar(range(3), progress=True).disable


def test_profile_json(tiny_bert, tmp_path):
    r = _ok(["profile", tiny_bert, "-b", 2, "-s", 16, "--rounds", 1, "--threads", 1, "--n-mixed", 0,
             "--out", tmp_path / "p.json", "--json", "-q"])
    row = json.loads(r.output)
    p = LatencyProfile.load(tmp_path / "p.json")
    assert row["path"] == str(tmp_path / "p.json")
    assert row["dense_ms"] == pytest.approx(p.base["median"] * 1e3) and row["max_speedup"] == pytest.approx(
        p.max_speedup())
    assert (row["batch"], row["seq"], row["threads"]) == (2, 16, 1)
