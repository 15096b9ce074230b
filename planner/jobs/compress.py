"""Gradual compression: a family of models, one per speedup target, from one command (ZipLM's gradual mode).

Targets run in increasing order. Step k starts from member k-1 (the dense model for k = 1), which is already
compressed and recovered, and
  1. rebuilds the OBS database on it (its current widths; levels are the profile's grid widths up to each
     layer's current width, so a layer never grows and a removed module stays removed),
  2. solves the DP for target k against the ORIGINAL dense model's profile: targets are speedups over the
     dense model, and module times depend on width only, so the one profile serves every step,
  3. applies the plan (sequential re-fit on the current model's outputs),
  4. distils the result from the dense teacher (stages/recover.py), and
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

from typing import TYPE_CHECKING

from .. import hardware, io
from ..adapters.checkpoint import Checkpoint
from ..config import ApplyConfig, PlanConfig, RecoverConfig, VerifyConfig
from ..errors import PlannerError
from ..reporting.tables import QUALITY, format_family, format_plan_table, held_back
from ..stages import apply as apply_stage
from ..stages import plan as plan_stage
from ..stages import recover as recover_stage
from ..stages import verify as verify_stage
from ..stages.profile import DTYPES, check_profile
from ..types import LatencyProfile, Plan, VerifyReport

if TYPE_CHECKING:
    import pandas as pd


def _log(msg: str, progress: bool):
    if progress:
        print(msg, flush=True)


def plan_step(ck: Checkpoint, prof: LatencyProfile, profile_path, target: float, cfg: PlanConfig, out_dir, db_dir,
              progress: bool = True) -> Plan:
    """The plan for `target` (a speedup over the profile's dense model) starting from checkpoint `ck`, which may
    already be compressed: its database only offers widths up to each layer's current width, so where the
    previous member already reaches the target (its plan overshot), the plan keeps it as it is. With cfg.search,
    SPDY's search refines it like a one-shot plan's."""
    return plan_stage.plan(ck, prof, profile_path, cfg.replace(targets=(target,)), out_dir, progress, db_dir=db_dir,
                           extra_options={"gradual": True})[0]


def compress(model_path, profile_path, out_dir, plan_cfg: PlanConfig = PlanConfig(),
             recover_cfg: RecoverConfig | None = RecoverConfig(), verify_cfg: VerifyConfig | None = None,
             progress: bool = True) -> "pd.DataFrame":
    """Gradual compression to every target in `plan_cfg.targets` (see the module docstring). `recover_cfg`
    None skips distillation (each member is then the one-shot result of the previous member). Returns the
    family table (one row per member) and writes it to OUT/family.md and OUT/family.json."""
    if not plan_cfg.structured:
        raise PlannerError("gradual compression shrinks the model step by step; --sparse-only is for one-shot "
                           "`planner plan` / `planner run`")
    out = io.check_out_dir(out_dir)
    hardware.check_device(plan_cfg.device)
    if recover_cfg is not None:
        hardware.check_device(recover_cfg.device, "--recover-device")
    dense_ck = Checkpoint.open(model_path)
    prof = LatencyProfile.load(profile_path)
    check_profile(prof, dense_ck.shape, prof.hardware.get("device", "cpu"), plan_cfg.allow_other_machine)
    targets = sorted(set(plan_cfg.targets))
    plan_stage.check_reachable(prof, targets)
    vc = verify_cfg or VerifyConfig(batch_size=prof.batch_size, seq_len=prof.seq_len,
                                    threads=prof.hardware.get("threads"), mode=prof.mode,
                                    device=prof.hardware.get("device", "cpu"))     # as the CLI does
    dense = None                                   # loaded once, when the first member is verified
    current, rows, plans = dense_ck, [], []
    with recover_stage.Apart() as apart:    # training in a child: this process verifies the members after it
        for k, t in enumerate(targets, 1):
            tag = f"{t:g}x"
            _log(f"[{k}/{len(targets)}] {tag}: from {current.path}", progress)
            plan_path = out / "plans" / f"plan-{tag}.json"
            if plan_path.exists():
                p = Plan.load(plan_path)
                if p.model.get("fingerprint") != current.fingerprint:
                    raise PlannerError(f"{plan_path} was planned from another model than {current.path}: delete {out} "
                                       f"(or that plan) to start over")
            else:
                p = plan_step(current, prof, profile_path, t, plan_cfg, out / "plans", out / "plans" / f"db-{tag}",
                              progress)
            plans.append(p)
            kept = " ".join(f"{l['heads']}/{l['ffn']}" for l in p.layers)
            _log(f"      plan: predicted {p.predicted_speedup:.2f}x, kept heads/ffn per layer {kept}", progress)
            oneshot = out / "models" / f"oneshot-{tag}"
            if not (oneshot / "config.json").exists():
                apply_stage.apply(current, p, oneshot, progress=progress,     # where the database was built
                                  cfg=ApplyConfig(device=plan_cfg.device, offload=plan_cfg.offload))
            member = out / "models" / f"gradual-{tag}"
            rec = None
            if recover_cfg is None:
                member = oneshot
            else:
                rec = apart.recover(oneshot, dense_ck.path, recover_cfg, member, progress)
                _log(f"      recovered: {rec.steps} steps in {rec.train_time/60:.1f} min; held-back "
                     f"{held_back(rec.before)} -> {held_back(rec.after)}", progress)
            reps = {}
            for name, mdir in (("oneshot", oneshot), ("gradual", member)):
                rpath = out / "verify" / f"{name}-{tag}.json"
                if rpath.exists():
                    reps[name] = VerifyReport.load(rpath)
                elif name == "gradual" or recover_cfg is not None:
                    dense = dense if dense is not None else dense_ck.load(vc.device, DTYPES[prof.dtype])
                    reps[name] = verify_stage.verify(dense_ck, Checkpoint.open(mdir), vc, prof, out=rpath,
                                                     dense_model=dense, progress=progress)
            v = reps["gradual"]
            keys, main = QUALITY[dense_ck.causal_lm]
            rows.append({"target": t, "predicted": v.predicted_speedup, "measured": v.measured_speedup,
                         **{k: v.quality[k] for k in keys},
                         **{f"oneshot_{k}": reps["oneshot"].quality[k] if recover_cfg is not None else None
                            for k in main},
                         "recover_min": rec.train_time / 60 if rec else 0.0,
                         "params_M": v.sizes["compressed_params"] / 1e6, "model": str(member)})
            _log(f"      verify: measured {v.measured_speedup:.2f}x (predicted {v.predicted_speedup:.2f}x), "
                 + ", ".join(f"{k} {v.quality[k]:.3f}" for k in main), progress)
            current = Checkpoint.open(member)
    import pandas as pd  # loaded when a table is made: the CLI starts faster
    df = pd.DataFrame(rows)
    table = format_family(df, prof) + "\n\n" + format_plan_table(plans)
    with io.atomic_path(out / "family.md") as tmp:
        tmp.write_text(table + "\n")
    io.write_json(out / "family.json", {"conditions": prof.conditions, "rows": rows,
                                        "recover": recover_cfg.to_dict() if recover_cfg else None})
    return df
