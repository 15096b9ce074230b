"""A run's JSON artefacts (profile, plans, verify reports) as one self-contained HTML page with PNG plots.

`collect` finds the artefacts by their `kind`, anywhere under the run directory except inside saved model
directories and OBS databases; `write` renders them into DIR/index.html + DIR/*.png, built under a
temporary name and swapped into place. The page needs no network and no script library; one inline script
marks any image that failed to load, so a broken page says so on screen (and a headless browser can check).
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import io
from ..errors import PlannerError
from ..progress import bar as progress_bar
from ..types import LatencyProfile, Plan, VerifyReport
from . import plots
from .tables import PLOTTED, interval_cell, layer_cell, loop_rows, per_set

KNOWN = {"LatencyProfile": LatencyProfile, "Plan": Plan, "VerifyReport": VerifyReport}
_NAME = re.compile(r"(?P<method>.+?)-(?P<target>\d+(?:\.\d+)?)x$")   # verify/<method>-<target>x.json


@dataclass
class Artefacts:
    root: Path
    profiles: list = field(default_factory=list)   # [(path, LatencyProfile)]
    plans: list = field(default_factory=list)      # [(path, Plan)]
    reports: list = field(default_factory=list)    # [(path, method, target, VerifyReport)]

    def rows(self) -> list[tuple[str, float, VerifyReport]]:
        return [(m, t, r) for _, m, t, r in self.reports]


def _skip_dir(d: Path) -> bool:
    """Saved models (config.json beside weights) and OBS databases hold JSON that is not ours to read."""
    return (d / "config.json").exists() and any(d.glob("*.safetensors")) or (d / "index.json").exists() and \
        any(d.glob("layer_*.safetensors"))


def _json_files(root: Path):
    stack = [root]
    while stack:
        d = stack.pop()
        if _skip_dir(d):
            continue
        for p in sorted(d.iterdir()):
            if p.name.startswith("."):
                continue                                  # temporary files of an interrupted write
            if p.is_dir():
                stack.append(p)
            elif p.suffix == ".json":
                yield p


def _method_target(path: Path, r: VerifyReport) -> tuple[str, float]:
    """Which plan a verify report measured: its own record, else the model's config, else its file name."""
    rec = r.plan
    if not rec:
        cfg = Path(r.compressed) / "config.json"
        if cfg.exists():
            try:
                rec = json.loads(cfg.read_text()).get("planner") or {}
            except (json.JSONDecodeError, OSError):
                rec = {}
    if rec.get("method") and rec.get("target_speedup"):
        # a recovered model keeps its plan's record and adds the training's: named as the run's table names it
        return rec["method"] + ("+recovery" if rec.get("recover") else ""), float(rec["target_speedup"])
    m = _NAME.match(path.stem)
    if m:
        return m["method"], float(m["target"])
    return path.stem, float(round(r.measured_speedup, 2))


def collect(run_dir) -> Artefacts:
    """Every profile, plan and verify report under `run_dir`, plus the profile a plan names if it lies
    elsewhere. A file with one of these kinds that does not read back is an error naming the file."""
    root = Path(run_dir)
    if not root.is_dir():
        raise PlannerError(f"run directory not found: {root} (pass the --out directory of `planner run` or of "
                           f"`planner plan`)")
    a = Artefacts(root)
    seen = set()
    for p in _json_files(root):
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlannerError(f"{p} is not valid JSON ({getattr(e, 'msg', e)}): regenerate or remove it") from None
        kind = d.get("kind") if isinstance(d, dict) else None
        if kind not in KNOWN:
            continue
        obj = KNOWN[kind].from_dict(d, p)
        seen.add(p.resolve())
        if kind == "LatencyProfile":
            a.profiles.append((p, obj))
        elif kind == "Plan":
            a.plans.append((p, obj))
        else:
            a.reports.append((p, *_method_target(p, obj), obj))
    for _, pl in a.plans:
        q = pl.profile.get("path")
        if q and Path(q).exists() and Path(q).resolve() not in seen:
            seen.add(Path(q).resolve())
            a.profiles.append((Path(q), LatencyProfile.load(q)))
    if not (a.profiles or a.plans or a.reports):
        raise PlannerError(f"no planner artefacts (latency profile, plans, verify reports) under {root}: "
                           f"run `planner run --out {root}` or point at a directory that has them")
    a.reports.sort(key=lambda x: (x[1] != "planner", x[1], x[2]))
    a.plans.sort(key=lambda x: (x[1].method != "planner", x[1].method, x[1].target_speedup))
    return a


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1180px;color:#222;
padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}figure{margin:1em 0}
img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.bad{background:#fee;color:#900;padding:.5em;border:1px solid #c00}.muted{color:#666;font-size:.85em}
code{background:#f6f6f6;padding:0 .2em}
"""

# Marks images that did not load: visible to a reader, and as data attributes on <body> for a headless check.
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  broken.forEach(function (i) {
    var d = document.createElement('p'); d.className = 'bad';
    d.textContent = 'image failed to load: ' + i.getAttribute('src');
    i.parentNode.insertBefore(d, i);
  });
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-broken-images', String(broken.length));
  document.body.setAttribute('data-ready', '1');
});
"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    th = "".join(f"<th class='{'l' if i < left else ''}'>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td class='{'l' if i < left else ''}'>{_e(c)}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def _rel(p: Path, root: Path) -> str:
    try:
        return str(p.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)


def _results_table(a: Artefacts) -> str:
    metrics = [m for m in PLOTTED if any(m in r.quality for *_, r in a.reports)]
    extra = sorted({k for *_, r in a.reports for k, v in r.quality.items()
                    if isinstance(v, (int, float)) and k not in metrics and k not in ("n_text", "speedup_spread")})
    sets = sorted({k for *_, r in a.reports for k in per_set(r.quality)})     # "spearman[docs]", ...
    header = ["method", "target", "predicted", "measured", "95% interval", "pred/meas−1", "speedup spread",
              *[f"{m} (worst set)" if sets else m for m in metrics], *extra, *sets,
              "params (M)", "dense ms", "compressed ms"]
    rows = []
    for _, m, t, r in a.reports:
        ps = per_set(r.quality)
        rows.append([m, f"{t:g}x", _fmt(r.predicted_speedup, ".2f") + ("x" if r.predicted_speedup else ""),
                     f"{r.measured_speedup:.2f}x", interval_cell(r),
                     _fmt(r.prediction_ratio - 1 if r.prediction_ratio else None, "+.1%"),
                     _fmt(r.quality.get("speedup_spread"), ".3f"),
                     *[_fmt(r.quality.get(k), ".3f") for k in metrics + extra], *[_fmt(ps.get(k), ".3f") for k in sets],
                     _fmt(r.sizes.get("compressed_params", 0) / 1e6, ".1f"),
                     f"{r.dense_time*1e3:.2f}", f"{r.compressed_time*1e3:.2f}"])
    return _table(header, rows, left=1)


def _conditions(a: Artefacts) -> str:
    parts = []
    for p, prof in a.profiles:
        h = prof.hardware
        fit = prof.fit or {}
        rows = [["file", _rel(p, a.root)], ["hardware", f"{h.get('name')} ({h.get('device')}, key {h.get('key')})"],
                ["threads", h.get("threads")], ["allocator", h.get("allocator", "default (not recorded)")], ["shape", f"batch {prof.batch_size} × seq {prof.seq_len}, "
                                                          f"{prof.dtype}, {prof.mode}"],
                ["architecture", prof.shape.get("key")], ["timing method", prof.method],
                ["dense time", f"{prof.base['median']*1e3:.2f} ms (spread {prof.base.get('spread', 0)*1e3:.2f} ms, "
                               f"{prof.base.get('reps', '?')} reps)"],
                ["non-prunable", f"{prof.constant*1e3:.2f} ms"], ["largest reachable speedup",
                                                                   f"{prof.max_speedup():.2f}x"],
                ["self-check", f"{fit.get('n_mixed', 0)} mixed architectures, max |pred/meas−1| "
                               f"{_fmt(fit.get('max_rel_error'), '.1%')} (additive alone "
                               f"{_fmt(fit.get('max_rel_error_additive'), '.1%')}), correction "
                               f"{'applied' if fit.get('applied') else 'not applied'}"],
                ["versions", f"torch {h.get('torch')}, transformers {h.get('transformers')}, python {h.get('python')}"],
                ["measured", prof.created], *[["note", n] for n in prof.notes]]
        parts.append(f"<h3>Latency profile</h3>{_table(['', ''], rows, left=2)}")
    if a.plans:
        o = a.plans[0][1].options
        pl = a.plans[0][1]
        rows = [["model", pl.model.get("path")], ["fingerprint", pl.model.get("fingerprint")],
                ["calibration", f"{o.get('calib_path') or 'shipped corpus'}, {o.get('n_calib')} passages × "
                                f"≤{o.get('calib_max_len')} tokens, held back {o.get('val_fraction')}"],
                ["error metric", o.get("error_norm")], ["kept weights", o.get("weights")],
                ["OBS dampening", o.get("damp")]]
        parts.append(f"<h3>Plans</h3>{_table(['', ''], rows, left=2)}")
    if a.reports:
        rows = []
        for p, m, t, r in a.reports:
            c = r.conditions
            rows.append([_rel(p, a.root), f"{c.get('name')} ({c.get('device')})", c.get("threads"),
                         f"{c.get('batch_size')} × {c.get('seq_len')}", c.get("reps"), r.quality.get("n_text", ""),
                         f"torch {c.get('torch')}", c.get("date")])
        parts.append("<h3>Verification</h3><p class='muted'>Speedup: dense and compressed forwards interleaved "
                     "(ABBA) on fixed inputs, ratio of medians. Quality: held-out text, dense vs compressed.</p>"
                     + _table(["report", "machine", "threads", "batch × seq", "reps", "passages", "versions", "date"],
                              rows))
    return "".join(parts)


def _plans_table(plans: list[Plan]) -> str:
    header = ["layer"] + [f"{p.method} {p.target_speedup:g}x" for p in plans]
    rows = [[l] + [f"{layer_cell(p.layers[l], 'attn')} / {layer_cell(p.layers[l], 'ffn')}" for p in plans]
            for l in range(len(plans[0].layers))]
    rows.append(["predicted"] + [f"{p.predicted_speedup:.2f}x" for p in plans])
    return _table(header, rows)


def _figures(a: Artefacts) -> list[tuple[str, str, object]]:
    """[(file name, caption, Figure)] for whatever the artefacts allow."""
    figs = []
    for i, (_, prof) in enumerate(a.profiles):
        sfx = f"-{i}" if len(a.profiles) > 1 else ""
        figs.append((f"latency{sfx}.png", f"Module latency vs kept width ({prof.conditions}). Points: measured "
                     f"medians with (p90−p10)/2 spread; line: the de-noised monotone curve the solver uses.",
                     plots.latency_curves(prof)))
        chk = plots.self_check(prof)
        if chk is not None:
            figs.append((f"self-check{sfx}.png", "The profile's self-check: random mixed architectures timed in "
                         "the running model, against the additive prediction.", chk))
    if a.plans:
        n = {len(p.layers) for _, p in a.plans}
        groups = [[p for _, p in a.plans if len(p.layers) == k] for k in sorted(n)]
        for j, g in enumerate(groups):
            figs.append((f"plans{'-' + str(j) if len(groups) > 1 else ''}.png",
                         "Kept attention heads and FFN neurons per layer for every target.", plots.plan_widths(g)))
    if a.reports:
        figs.append(("frontier.png", "Speed/quality frontier: measured speedup against the quality kept on "
                     "held-out text (dense = 1).", plots.frontier(a.rows())))
        pv = plots.predicted_vs_measured(a.rows())
        if pv is not None:
            figs.append(("predicted-vs-measured.png", "Predicted against measured speedup; the band is ±5%.", pv))
    return figs


def render(a: Artefacts, figures: list[tuple[str, str, object]]) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    body = [f"<h1>planner report</h1><p class='muted'>Run <code>{_e(a.root)}</code>, written {now}: "
            f"{len(a.profiles)} profile(s), {len(a.plans)} plan(s), {len(a.reports)} verify report(s).</p>"]
    if a.reports:
        body.append("<h2>Results</h2>" + _results_table(a))
    fig_html = "".join(f"<figure><img src='{_e(name)}' alt='{_e(cap)}'><figcaption>{_e(cap)}</figcaption></figure>"
                       for name, cap, _ in figures)
    body.append("<h2>Figures</h2>" + fig_html)
    loops = [row for _, p in a.plans for row in loop_rows(p)]
    if loops:
        body.append("<h2>Closed loop</h2><p class='muted'>Every round of every plan: the architecture timed "
                    "interleaved against a copy of the dense model in the profile's regime; the prediction of the "
                    "profile alone and as corrected; the correction fitted for the next round.</p>"
                    + _table(list(loops[0]), [list(r.values()) for r in loops], left=2))
    if a.plans:
        body.append("<h2>Per-layer plans (kept heads / FFN neurons; @sN: full width, linears N% sparse)</h2>" + _plans_table([p for _, p in a.plans]))
    body.append("<h2>Conditions of every measurement</h2>" + _conditions(a))
    files = [_rel(p, a.root) for p, _ in a.profiles] + [_rel(p, a.root) for p, _ in a.plans] + \
        [_rel(x[0], a.root) for x in a.reports]
    body.append("<h2>Artefacts read</h2><ul class='muted'>" + "".join(f"<li>{_e(f)}</li>" for f in files) + "</ul>")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>planner report: {_e(a.root.name)}"
            f"</title><meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style>"
            f"</head><body>{''.join(body)}<script>{_SCRIPT}</script></body></html>\n")


def write(run_dir, out_dir=None, dpi: int = 110, progress: bool = True) -> Path:
    """Write the report of `run_dir` into `out_dir` (default RUN_DIR/report); returns the index.html path."""
    a = collect(run_dir)
    out = Path(out_dir) if out_dir else a.root / "report"
    figures = _figures(a)
    with io.atomic_dir(out) as tmp:
        for name, _, fig in progress_bar(figures, desc="report", unit="plot", progress=progress):
            fig.savefig(tmp / name, dpi=dpi)
        (tmp / "index.html").write_text(render(a, figures), encoding="utf-8")
    return out / "index.html"
