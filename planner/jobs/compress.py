"""Gradual compression: a family of models, one per speedup target, from one command (ZipLM's gradual mode).

Targets run in increasing order. Step k starts from member k-1 (the dense model for k = 1), which is already
compressed and recovered, and
  1. rebuilds the OBS database on it (its current widths; levels are the profile's grid widths up to each
     layer's current width, so a layer never grows and a removed module stays removed),
  2. solves the DP for target k against the ORIGINAL dense model's profile: targets are speedups over the
     dense model, and module times depend on width only, so the one profile serves every step,
  3. applies the plan (sequential re-fit on the current model's outputs),
  4. distils the result from the dense teacher (`api.recover`), and
  5. verifies it against the dense model (measured and predicted speedup, held-out quality).
Everything goes into one directory and every step is skipped when its output is there, so an interrupted
run resumes where it stopped (recovery itself resumes from its checkpoint):

    OUT/plans/db-<t>x/  OUT/plans/plan-<t>x.json    database on the previous member, plan for target t
    OUT/models/oneshot-<t>x/                         applied, before recovery
    OUT/models/gradual-<t>x/                         the member: recovered (with recover.json)
    OUT/verify/{oneshot,gradual}-<t>x.json           verify reports
    OUT/family.md, OUT/family.json                   one row per member
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import api, io
from ..config import PlanConfig, RecoverConfig, VerifyConfig
from ..stages.database import Database
from ..errors import PlannerError, UnreachableTarget
from ..adapters.checkpoint import fingerprint, load_model
from ..stages.plan import format_plan_table, solve_plans
from ..stages.profile import check_profile
from ..types import LatencyProfile, Plan, VerifyReport


def _log(msg: str, progress: bool):
    if progress:
        print(msg, flush=True)


def plan_step(model_path, prof: LatencyProfile, profile_path, target: float, cfg: PlanConfig, db_dir,
              progress: bool = True) -> Plan:
    """The plan for `target` (a speedup over the profile's dense model) starting from `model_path`, which may
    already be compressed: its database only offers widths up to each layer's current width."""
    model, adapter = load_model(model_path)
    check_profile(prof, adapter.shape(model), prof.hardware.get("device", "cpu"), cfg.allow_other_machine)
    now = prof.predict([s.to_dict() for s in adapter.spec(model)])
    if prof.base["median"] / now >= target:
        raise PlannerError(f"target {target:g}x is not above the previous member's predicted "
                           f"{prof.base['median'] / now:.2f}x: give increasing, distinct targets")
    del model
    db: Database = api.build_database(model_path, prof, cfg, db_dir, progress)
    info = {"path": str(model_path), "fingerprint": fingerprint(model_path)}
    calib = {"calib_path": cfg.calib_path, "n_calib": cfg.n_calib, "calib_max_len": cfg.calib_max_len,
             "calib_batch": cfg.calib_batch, "damp": cfg.damp, "val_fraction": cfg.val_fraction,
             "weights": "sequential" if cfg.sequential else "obs", "gradual": True}
    return solve_plans(db, prof, [target], cfg.error_norm, cfg.n_buckets, info, profile_path, calib)[0]


def compress(model_path, profile_path, out_dir, plan_cfg: PlanConfig = PlanConfig(),
             recover_cfg: RecoverConfig | None = RecoverConfig(), verify_cfg: VerifyConfig | None = None,
             progress: bool = True) -> pd.DataFrame:
    """Gradual compression to every target in `plan_cfg.targets` (see the module docstring). `recover_cfg`
    None skips distillation (each member is then the one-shot result of the previous member). Returns the
    family table (one row per member) and writes it to OUT/family.md and OUT/family.json."""
    if not plan_cfg.structured:
        raise PlannerError("gradual compression shrinks the model step by step; --sparse-only is for one-shot "
                           "`planner plan` / `planner run`")
    out = io.check_out_dir(out_dir)
    model_path = Path(model_path)
    prof = LatencyProfile.load(profile_path)
    dense, adapter = load_model(model_path)
    check_profile(prof, adapter.shape(dense), prof.hardware.get("device", "cpu"), plan_cfg.allow_other_machine)
    targets = sorted(set(plan_cfg.targets))
    too_far = [t for t in targets if t > prof.max_speedup()]
    if too_far:
        raise UnreachableTarget(f"speedup {max(too_far):g}x is not reachable with this profile: the largest "
                                f"reachable speedup is {prof.max_speedup():.2f}x")
    vc = verify_cfg or VerifyConfig(batch_size=prof.batch_size, seq_len=prof.seq_len,
                                    threads=prof.hardware.get("threads"), mode=prof.mode)
    current, rows, plans = model_path, [], []
    for k, t in enumerate(targets, 1):
        tag = f"{t:g}x"
        _log(f"[{k}/{len(targets)}] {tag}: from {current}", progress)
        plan_path = out / "plans" / f"plan-{tag}.json"
        if plan_path.exists():
            p = Plan.load(plan_path)
            if p.model.get("fingerprint") != fingerprint(current):
                raise PlannerError(f"{plan_path} was planned from another model than {current}: delete {out} "
                                   f"(or that plan) to start over")
        else:
            p = plan_step(current, prof, profile_path, t, plan_cfg, out / "plans" / f"db-{tag}", progress)
            p.save(plan_path)
        plans.append(p)
        kept = " ".join(f"{l['heads']}/{l['ffn']}" for l in p.layers)
        _log(f"      plan: predicted {p.predicted_speedup:.2f}x, kept heads/ffn per layer {kept}", progress)
        oneshot = out / "models" / f"oneshot-{tag}"
        if not (oneshot / "config.json").exists():
            api.apply(current, p, oneshot, progress=progress)
        member = out / "models" / f"gradual-{tag}"
        rec = None
        if recover_cfg is None:
            member = oneshot
        else:
            rec = api.recover(oneshot, model_path, recover_cfg, out=member, progress=progress)
            _log(f"      recovered: {rec.steps} steps in {rec.train_time/60:.1f} min; held-back "
                 f"{_q(rec.before)} -> {_q(rec.after)}", progress)
        reps = {}
        for name, mdir in (("oneshot", oneshot), ("gradual", member)):
            rpath = out / "verify" / f"{name}-{tag}.json"
            if rpath.exists():
                reps[name] = VerifyReport.load(rpath)
            elif name == "gradual" or recover_cfg is not None:
                reps[name] = api.verify(model_path, mdir, vc, profile_path=profile_path, out=rpath,
                                        dense_model=dense, progress=progress)
        v = reps["gradual"]
        keys, main = QUALITY[adapter.causal_lm]
        rows.append({"target": t, "predicted": v.predicted_speedup, "measured": v.measured_speedup,
                     **{k: v.quality[k] for k in keys},
                     **{f"oneshot_{k}": reps["oneshot"].quality[k] if recover_cfg is not None else None
                        for k in main},
                     "recover_min": rec.train_time / 60 if rec else 0.0,
                     "params_M": v.sizes["compressed_params"] / 1e6, "model": str(member)})
        _log(f"      verify: measured {v.measured_speedup:.2f}x (predicted {v.predicted_speedup:.2f}x), "
             + ", ".join(f"{k} {v.quality[k]:.3f}" for k in main), progress)
        current = member
    df = pd.DataFrame(rows)
    table = format_family(df, prof) + "\n\n" + format_plan_table(plans)
    with io.atomic_path(out / "family.md") as tmp:
        tmp.write_text(table + "\n")
    io.write_json(out / "family.json", {"conditions": prof.conditions, "rows": rows,
                                        "recover": recover_cfg.to_dict() if recover_cfg else None})
    return df


# the family table's quality columns, (all, also shown for the one-shot member): encoders / causal LMs
QUALITY = {False: (("cosine", "spearman", "nn_agree"), ("spearman", "nn_agree")),
           True: (("ppl", "ppl_increase", "top1_agree"), ("ppl_increase", "top1_agree"))}


def _q(d: dict) -> str:
    if "val_spearman" in d:
        return f"spearman {d['val_spearman']:.3f} / nn {d['val_nn_agree']:.3f}"
    if "val_ppl" in d:
        return f"perplexity {d['val_ppl']:.2f}, loss {d['val_total']:.4f}"
    return f"loss {d.get('val_total', float('nan')):.4f}"


def format_family(df: pd.DataFrame, prof: LatencyProfile) -> str:
    d = df.drop(columns=["model"]).copy()
    d["target"] = d["target"].map(lambda x: f"{x:g}x")
    for c in ("predicted", "measured"):
        d[c] = d[c].map(lambda x: f"{x:.2f}x" if x is not None else "n/a")
    d = d.dropna(axis=1, how="all")
    return f"Conditions: {prof.conditions}\n\n" + d.to_markdown(index=False, floatfmt=".3f")
