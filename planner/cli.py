"""Command line: parse, build a config, call the library. No logic lives here.

The options of every command are generated from the fields of the config dataclasses (config.py: help text,
flag names and choices in the fields' metadata), so every setting has a flag and a default is written once.
A PlannerError (bad input the user can fix) or an OSError (a full disk, a permission) prints one line and exits 2;
Ctrl-C exits 130.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import click

from .config import ApplyConfig, PlanConfig, ProfileConfig, RecoverConfig, RunConfig, VerifyConfig
from .errors import PlannerError, os_error_message

_model_arg = click.argument("model", type=click.Path(path_type=Path))


def _fail(msg: str, code: int = 2):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PlannerError as e:
            _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        except OSError as e:                   # the disk filled, a permission, a path that vanished mid-run
            _fail(os_error_message(e))
        except KeyboardInterrupt:
            _fail("interrupted; rerun the same command to resume", 130)


# ------------------------------------------------------------------ options generated from the config fields

# which configs each command exposes, as (config class, flag prefix, fields left out): the flags test reads this
COMMAND_CONFIGS: dict[str, list[tuple[type, str, tuple[str, ...]]]] = {}
_RUN_SHARED = ("batch_size", "seq_len", "threads", "device", "mode")     # verify inherits them from the profile


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f.name.replace("_", "-"))


def _param(f: dataclasses.Field, prefix: str) -> str:
    return (prefix + f.name).replace("-", "_")


def _option(f: dataclasses.Field, prefix: str, required: bool):
    m = f.metadata
    flag, dest = f"--{prefix}{_flag_name(f)}", _param(f, prefix)
    names = [flag] + ([m["short"]] if m.get("short") and not prefix else [])
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kw = {"help": m["help"]}
    if m.get("invert"):                                    # e.g. --sparse-only sets structured=False
        return click.option(*names, dest, is_flag=True, default=False, **kw)
    if isinstance(default, bool):
        return click.option(f"{flag}/--{prefix}no-{_flag_name(f)}", dest, default=default, show_default=True, **kw)
    typ = click.Choice(list(m["choices"])) if "choices" in m else m.get("type", type(default))
    if m.get("path"):
        typ = click.Path(path_type=Path)
    if m.get("multiple"):
        if f.name == "sparsity":                           # each a number or a comma-separated list
            typ = str
        return click.option(*names, dest, type=typ, multiple=True, required=required, metavar=m.get("metavar"),
                            **({} if required else {"default": default, "show_default": bool(default)}), **kw)
    return click.option(*names, dest, type=typ, default=default, show_default=default is not None, **kw)


def config_options(command: str, cls, prefix: str = "", exclude: tuple[str, ...] = (), required=()):
    """Decorator: a click option for every field of config class `cls` (but `exclude`), flags prefixed."""
    COMMAND_CONFIGS.setdefault(command, []).append((cls, prefix, tuple(exclude)))

    def deco(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name not in exclude:
                fn = _option(f, prefix, f.name in required)(fn)
        return fn
    return deco


def _levels(texts) -> tuple[float, ...]:
    """--sparsity given once or repeated, each a comma-separated list: every level, once, ascending."""
    try:
        return tuple(sorted({float(x) for t in texts for x in t.replace(" ", "").split(",") if x}))
    except ValueError:
        raise PlannerError(f"--sparsity takes comma-separated numbers such as 0.5,0.9; got {' '.join(texts)!r}") \
            from None


def config_from(cls, kw: dict, prefix: str = "", exclude: tuple[str, ...] = (), **fixed):
    """An instance of `cls` from the parsed options of config_options (plus `fixed` values)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.name in fixed:
            continue
        v = kw.pop(_param(f, prefix))
        if f.metadata.get("invert"):
            v = not v
        elif f.name == "sparsity":
            v = _levels(v)
        elif f.metadata.get("multiple"):
            v = tuple(v)
        elif f.metadata.get("path") and v is not None:
            v = str(v)
        values[f.name] = v
    return cls(**values, **fixed)


# ---------------------------------------------------------------------------------------------- commands

@click.group(cls=_Group)
@click.version_option(package_name="planner")
def main():
    """Make a Hugging Face model N times faster on this machine, losing as little as possible.

    \b
    planner run                                     # the whole job on the embedded MiniLM
    planner profile MODEL --batch-size 8 --seq-len 128
    planner plan MODEL --profile P.json --speedup 1.5 --speedup 2 --out plans/
    planner apply MODEL plans/plan-2x.json --out model-2x/
    planner verify MODEL model-2x/
    """


@main.command()
@_model_arg
@config_options("profile", ProfileConfig)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="profile JSON (default: profiles/<hardware>/<shape>/<mode>-b<B>-s<T>-<dtype>.json)")
@click.option("--json", "as_json", is_flag=True, help="print the profile's summary row as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
def profile(model, out, as_json, quiet, **kw):
    """Time the dense model and every prunable module at every kept width on this machine.

    Example: planner profile ./my-bert --batch-size 8 --seq-len 128 --threads 2
    """
    from . import api
    p, path = api.profile(model, config_from(ProfileConfig, kw), out=out, progress=not quiet)
    if as_json:
        click.echo(json.dumps(api.profile_summary(p, path), indent=2, sort_keys=True))
        return
    click.echo(f"{path}: dense {p.base['median']*1e3:.2f} ms, non-prunable {p.constant*1e3:.2f} ms, "
               f"largest reachable speedup {p.max_speedup():.1f}x ({p.conditions})")
    noise = p.base.get("noise")
    if noise:
        click.echo(f"  machine noise: the dense model against a copy of itself {noise['ratio']:.3f} +-"
                   f"{noise['halfwidth']:.1%} ({noise['pairs']} pairs); {noise['loose']} of {noise['variants']} "
                   f"variants still wider than +-{noise['bound']:.0%} after {noise['extra_rounds']} extra rounds")
    for kind, sp in p.sparse.items():
        cross = p.sparse_crossover(kind)
        times = ", ".join(f"{lv:g} {ker}: {t*1e3:.2f} ms" for lv, ker, t in zip(sp["levels"], sp["kernels"],
                                                                               sp["median"]))
        click.echo(f"  {kind} on sparse kernels ({times}; dense {p.times(kind).monotone[-1]*1e3:.2f} ms): "
                   + (f"faster than dense from {cross:g} sparsity" if cross is not None else
                      "never faster than dense at the levels timed"))


@main.command()
@click.option("--root", type=click.Path(path_type=Path), default=Path("profiles"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
def profiles(root, as_json):
    """List the stored latency profiles with their conditions.

    Example: planner profiles --root profiles/
    """
    from . import api
    rows = api.list_profiles(root)
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        click.echo(f"no profiles under {root}; make one with `planner profile MODEL`")
        return
    for r in rows:
        if "error" in r:
            click.echo(f"{r['path']}: unreadable ({r['error']})")
            continue
        err = f", self-check within {r['check_max_err']:.1%}" if r["check_max_err"] is not None else ""
        click.echo(f"{r['path']}: {r['hardware']} ({r['device']}, {r['threads']} threads), {r['shape']}, "
                   f"{r['mode']} b{r['batch']} x s{r['seq']} {r['dtype']}, dense {r['dense_ms']:.2f} ms, "
                   f"up to {r['max_speedup']:.1f}x{err}, torch {r['torch']}, {r['created']}")


@main.command()
@_model_arg
@click.option("--profile", "profile_path", type=click.Path(path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="directory for the database and plans")
@config_options("plan", PlanConfig, required=("targets",))
@click.option("--json", "as_json", is_flag=True, help="print the plans as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
def plan(model, profile_path, out, as_json, quiet, **kw):
    """Build the OBS database and solve for every speedup target in one DP.

    Example: planner plan ./my-bert --profile profiles/.../prefill-b8-s128-float32.json -x 1.5 -x 2 -x 3 --out run/
    """
    from . import api
    from .reporting.tables import format_plan_table, loop_lines
    plans = api.plan(model, profile_path, config_from(PlanConfig, kw), out, progress=not quiet)
    if not plans:                       # --distributed, ranks other than 0: they built their blocks, rank 0 reports
        return
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in plans], indent=2, sort_keys=True))
    else:
        click.echo(format_plan_table(plans))
        for p in plans:
            for line in loop_lines(p):
                click.echo(line)
        click.echo(f"plans written to {out}/plan-<target>x.json")


@main.command()
@_model_arg
@click.argument("plan_path", metavar="PLAN", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="output model directory")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help="calibration text (default: the plan's)")
@click.option("--weights", type=click.Choice(["sequential", "obs", "none"]), default=None,
              help="how kept weights are fitted (default: as planned)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
@config_options("apply", ApplyConfig)
@click.option("--recover", "recover_", is_flag=True, help="then distil it from MODEL (see `planner recover`)")
@config_options("apply", RecoverConfig, prefix="recover-")
def apply(model, plan_path, out, calib, weights, quiet, recover_, **kw):
    """Stitch the OBS-corrected weights, shrink the modules and save a portable Hugging Face directory.

    With --recover, the result is then distilled from MODEL before it is written (resumable like `recover`).

    Example: planner apply ./my-bert run/plan-2x.json --out my-bert-2x/ [--recover --recover-minutes 10]

    Large models on a GPU: planner apply ./my-llm plan-2x.json --out my-llm-2x/ --device cuda --offload
    """
    from . import api
    from .adapters.checkpoint import n_params
    from .reporting.tables import recover_summary
    acfg = config_from(ApplyConfig, kw)
    rcfg = config_from(RecoverConfig, kw, prefix="recover-")
    load = f"load with AutoModel.from_pretrained('{out}', trust_remote_code=True) or planner.load('{out}')"
    if recover_:
        rep = api.apply_recover(model, plan_path, out, rcfg, calib_path=calib, weights=weights, progress=not quiet,
                                apply_cfg=acfg)
        click.echo(recover_summary(rep))
        click.echo(load)
        return
    path, m = api.apply(model, plan_path, out, calib_path=calib, weights=weights, progress=not quiet, cfg=acfg)
    click.echo(f"{path}: {n_params(m)/1e6:.1f}M parameters; {load}")


@main.command()
@click.argument("dense", type=click.Path(path_type=Path))
@click.argument("compressed", type=click.Path(path_type=Path))
@config_options("verify", VerifyConfig)
@click.option("--profile", "profile_path", type=click.Path(path_type=Path), default=None,
              help="predict the speedup from this profile (default: the plan recorded in the model)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write the report JSON here")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
def verify(dense, compressed, profile_path, out, as_json, quiet, **kw):
    """Measure speedup (interleaved with the dense model) and quality kept on held-out text
    (causal LMs: perplexity; encoders: embedding similarity structure).

    Example: planner verify ./my-bert my-bert-2x/ --batch-size 8 --seq-len 128
    """
    from . import api
    from .reporting.tables import verify_lines
    rep = api.verify(dense, compressed, config_from(VerifyConfig, kw), profile_path=profile_path, out=out,
                     progress=not quiet)
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2, sort_keys=True))
        return
    for line in verify_lines(rep):
        click.echo(line)


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--speedup", "-x", "targets", type=float, multiple=True, default=RunConfig.targets, show_default=True,
              help="speedup targets over the dense model")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/minilm"), show_default=True)
@config_options("run", ProfileConfig)
@config_options("run", PlanConfig, exclude=("targets", "device", "distributed"))
@config_options("run", VerifyConfig, prefix="verify-", exclude=_RUN_SHARED)
@click.option("--recover-minutes", type=float, default=RunConfig.recover_minutes, show_default=True,
              help="distillation budget per planned model (0: one-shot models only)")
@config_options("run", RecoverConfig, prefix="recover-", exclude=("minutes", "steps", "threads", "device"))
@click.option("--no-baseline", is_flag=True, help="skip the uniform magnitude baseline")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or step messages; only the results table")
def run(model, targets, out, recover_minutes, no_baseline, quiet, **kw):
    """The whole job: profile → plan → apply → verify (+ magnitude baseline), then a results table.

    MODEL defaults to the embedded all-MiniLM-L6-v2. Rerunning resumes from what is already in --out.

    Example: planner run --speedup 1.5 --speedup 2 --speedup 3 --batch-size 8 --seq-len 128
    """
    from . import api
    pcfg = config_from(ProfileConfig, kw)
    cfg = RunConfig(targets=tuple(targets), profile=pcfg,
                    plan=config_from(PlanConfig, kw, exclude=("targets", "device", "distributed")),
                    verify=config_from(VerifyConfig, kw, prefix="verify-", exclude=_RUN_SHARED), baseline=not no_baseline,
                    recover=config_from(RecoverConfig, kw, prefix="recover-", exclude=("minutes", "steps", "threads",
                                                                                       "device")),
                    recover_minutes=recover_minutes)
    api.run(model, out, cfg, quiet=quiet)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="output directory for index.html and the PNG plots (default: RUN_DIR/report)")
@click.option("--json", "as_json", is_flag=True, help="print what was written as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
def report(run_dir, out, as_json, quiet):
    """Render a run's profile, plans and verify reports as an HTML page with PNG plots.

    Reads every latency profile, plan and verify report under RUN_DIR (the --out of `planner run`, or of
    `planner plan` with verify reports saved beside it).

    Example: planner report runs/minilm --out runs/minilm/report
    """
    from . import api
    path = api.report(run_dir, out, progress=not quiet)
    if as_json:
        click.echo(json.dumps({"index": str(path), "files": sorted(str(p) for p in path.parent.iterdir())},
                              indent=2))
        return
    click.echo(f"report written to {path} (open it in a browser)")


# ------------------------------------------------------------------------- recovery and gradual compression

@main.command()
@click.argument("compressed", type=click.Path(path_type=Path))
@click.option("--teacher", type=click.Path(path_type=Path), required=True, help="the dense model it was made from")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="output model directory")
@config_options("recover", RecoverConfig)
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
def recover(compressed, teacher, out, quiet, **kw):
    """Distil a compressed model from its dense teacher (token-level + head/embedding KD).

    Writes the same portable directory as `apply`, plus recover.json. A checkpoint in OUT.ckpt/ lets an
    interrupted run resume: rerun the same command. A finished run is not redone.

    Example: planner recover my-bert-2x/ --teacher ./my-bert --data my_text.txt --minutes 10 --out my-bert-2x-rec/
    """
    from . import api
    from .reporting.tables import recover_summary
    rep = api.recover(compressed, teacher, config_from(RecoverConfig, kw), out=out, progress=not quiet)
    click.echo(recover_summary(rep))


@main.command()
@_model_arg
@click.option("--profile", "profile_path", type=click.Path(path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="directory for the whole family")
@config_options("compress", PlanConfig, required=("targets",), exclude=("distributed",))
@click.option("--no-recover", is_flag=True, help="no distillation between steps")
@config_options("compress", RecoverConfig, prefix="recover-")
@config_options("compress", VerifyConfig, prefix="verify-", exclude=_RUN_SHARED)
@click.option("--reps", "legacy_reps", type=int, default=None, hidden=True, help="deprecated: --verify-reps")
@click.option("--quiet", "-q", is_flag=True)
def compress(model, profile_path, out, no_recover, legacy_reps, quiet, **kw):
    """Gradual compression: a family of models, one per target, each planned, applied and recovered from the
    previous one (the OBS database is rebuilt on the current model; the profile is the dense model's).

    Every member is verified against the dense model; the table goes to OUT/family.md. Rerunning resumes.

    Example: planner compress ./my-bert --profile P.json -x 1.5 -x 2 -x 3 --recover-minutes 10 --out family/
    """
    from . import api
    from .reporting.tables import format_family
    from .types import LatencyProfile
    prof = LatencyProfile.load(profile_path)
    pcfg = config_from(PlanConfig, kw, exclude=("distributed",))
    rcfg = config_from(RecoverConfig, kw, prefix="recover-")
    if legacy_reps is not None:
        warnings.warn("planner compress --reps is deprecated: use --verify-reps", FutureWarning, stacklevel=1)
        kw["verify_reps"] = legacy_reps
    vcfg = config_from(VerifyConfig, kw, prefix="verify-", exclude=_RUN_SHARED, batch_size=prof.batch_size,
                       seq_len=prof.seq_len, threads=prof.hardware.get("threads"), mode=prof.mode,
                       device=prof.hardware.get("device", "cpu"))
    df = api.compress(model, profile_path, out, pcfg, None if no_recover else rcfg, vcfg, progress=not quiet)
    click.echo(format_family(df, prof))
    click.echo(f"family written to {out}/models/; table in {out}/family.md")


if __name__ == "__main__":
    main()
