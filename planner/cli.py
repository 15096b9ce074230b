"""Command line: parse, build a config, call the library. No logic lives here.

A PlannerError (bad input the user can fix) prints one line and exits 2; Ctrl-C exits 130.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .config import PlanConfig, ProfileConfig, VerifyConfig
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


def _profile_opts(f):
    for opt in reversed([
        click.option("--batch-size", "-b", default=ProfileConfig.batch_size, show_default=True),
        click.option("--seq-len", "-s", default=ProfileConfig.seq_len, show_default=True,
                     help="prompt length (prefill) or KV-cache length (decode)"),
        click.option("--mode", type=click.Choice(["prefill", "decode"]), default=ProfileConfig.mode,
                     show_default=True, help="latency regime; decode = one new token per sequence (causal LMs)"),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
                     show_default=True),
        click.option("--threads", type=int, default=None, help="CPU threads (default: all available)"),
        click.option("--ffn-step", default=ProfileConfig.ffn_step, show_default=True,
                     help="FFN widths timed: multiples of this"),
        click.option("--method", type=click.Choice(["model", "module"]), default="model", show_default=True,
                     help="time modules inside the running model, or alone"),
        click.option("--rounds", default=ProfileConfig.rounds, show_default=True, help="interleaved rounds"),
        click.option("--smooth", default=ProfileConfig.smooth, show_default=True,
                     help="de-noise module time curves over +-N grid points (0: use the medians as measured)"),
        click.option("--n-mixed", default=ProfileConfig.n_mixed, show_default=True,
                     help="random mixed architectures timed to fit and check the latency model (0: none)"),
        click.option("--sparsity", multiple=True, metavar="LEVELS",
                     help="also time every module on the sparse kernel at these sparsities, e.g. 0.5,0.9,0.95 "
                          "or --sparsity 0.5 --sparsity 0.9 (CPU: CSR; CUDA adds 2:4)"),
        click.option("--sparse-reps", default=ProfileConfig.sparse_reps, show_default=True,
                     help="dense/sparse timing pairs per sparse level and round (sparse kernels are noisier)"),
    ]):
        f = opt(f)
    return f


def _levels(texts) -> tuple[float, ...]:
    """--sparsity given once or repeated, each a comma-separated list: every level, once, ascending."""
    try:
        return tuple(sorted({float(x) for t in texts for x in t.replace(" ", "").split(",") if x}))
    except ValueError:
        raise PlannerError(f"--sparsity takes comma-separated numbers such as 0.5,0.9; got {' '.join(texts)!r}") \
            from None


def _profile_cfg(kw) -> ProfileConfig:
    return ProfileConfig(batch_size=kw["batch_size"], seq_len=kw["seq_len"], mode=kw["mode"], device=kw["device"],
                         dtype=kw["dtype"],
                         threads=kw["threads"], ffn_step=kw["ffn_step"], method=kw["method"], rounds=kw["rounds"],
                         n_mixed=kw["n_mixed"], smooth=kw["smooth"], sparsity=_levels(kw["sparsity"]),
                         sparse_reps=kw["sparse_reps"])


@main.command()
@_model_arg
@_profile_opts
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="profile JSON (default: profiles/<hardware>/<shape>/<mode>-b<B>-s<T>-<dtype>.json)")
@click.option("--json", "as_json", is_flag=True, help="print the profile's summary row as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
def profile(model, out, as_json, quiet, **kw):
    """Time the dense model and every prunable module at every kept width on this machine.

    Example: planner profile ./my-bert --batch-size 8 --seq-len 128 --threads 2
    """
    from . import api
    p, path = api.profile(model, _profile_cfg(kw), out=out, progress=not quiet)
    if as_json:
        click.echo(json.dumps(api.profile_summary(p, path), indent=2, sort_keys=True))
        return
    click.echo(f"{path}: dense {p.base['median']*1e3:.2f} ms, non-prunable {p.constant*1e3:.2f} ms, "
               f"largest reachable speedup {p.max_speedup():.1f}x ({p.conditions})")
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


def _plan_opts(f):
    for opt in reversed([
        click.option("--calib", type=click.Path(path_type=Path), default=None,
                     help="calibration text, one passage per line (default: the shipped corpus)"),
        click.option("--n-calib", default=PlanConfig.n_calib, show_default=True),
        click.option("--error-norm", type=click.Choice(["residual", "module"]), default=PlanConfig.error_norm,
                     show_default=True, help="normalise errors by the residual stream or by the module output"),
        click.option("--val-fraction", default=PlanConfig.val_fraction, show_default=True,
                     help="share of calibration passages held back to score errors"),
        click.option("--sequential/--no-sequential", default=True, show_default=True,
                     help="refit kept weights on inputs from the already-compressed layers"),
        click.option("--allow-other-machine", is_flag=True, help="accept a profile measured on another machine"),
        click.option("--sparse/--no-sparse", default=PlanConfig.sparse, show_default=True,
                     help="also offer the sparse levels the profile timed (profile --sparsity), per module"),
        click.option("--sparse-only", is_flag=True,
                     help="offer only the full width or a sparse level per module (the architecture is kept)"),
        click.option("--search", default=PlanConfig.search, show_default=True, metavar="N",
                     help="SPDY search: score N candidate plans per target by the stitched model's calibration "
                          "loss and keep the best (0: the plain DP); resumable"),
        click.option("--search-minutes", type=float, default=None, help="time budget of the search per target"),
        click.option("--offload", is_flag=True,
                     help="keep the model in CPU memory and move one block at a time to --device (large models)"),
    ]):
        f = opt(f)
    return f


def _plan_cfg(targets, kw, device="cpu") -> PlanConfig:
    return PlanConfig(targets=tuple(targets), calib_path=str(kw["calib"]) if kw["calib"] else None,
                      n_calib=kw["n_calib"], error_norm=kw["error_norm"], val_fraction=kw["val_fraction"],
                      sequential=kw["sequential"], allow_other_machine=kw["allow_other_machine"], device=device,
                      sparse=kw["sparse"], structured=not kw["sparse_only"], search=kw["search"],
                      search_minutes=kw["search_minutes"],
                      offload=kw["offload"])


def _recover_opts(prefix: str = "", full: bool = True):
    """RecoverConfig options; with a prefix (apply --recover, compress) only the common ones."""
    from .config import RecoverConfig as R
    p = f"--{prefix}" if prefix else "--"
    opts = [
        click.option(f"{p}data", f"{prefix.replace('-', '_')}data", type=click.Path(path_type=Path), default=None,
                     help="training text, one passage per line "
                          "(default: the shipped calibration and distillation corpora)"),
        click.option(f"{p}minutes", f"{prefix.replace('-', '_')}minutes", type=float, default=None,
                     help=f"training-time budget; sets the number of steps (default: {R.minutes:g}, none with "
                          f"{p}steps)"),
        click.option(f"{p}steps", f"{prefix.replace('-', '_')}steps", type=int, default=None,
                     help="a fixed number of optimizer steps instead of the time budget"),
        click.option(f"{p}lr", f"{prefix.replace('-', '_')}lr", type=float, default=R.lr, show_default=True,
                     help="AdamW peak learning rate"),
        click.option(f"{p}seed", f"{prefix.replace('-', '_')}seed", type=int, default=R.seed, show_default=True),
    ]
    if full:
        opts += [
            click.option("--batch-size", "-b", default=R.batch_size, show_default=True, help="passages per micro-batch"),
            click.option("--grad-accum", default=R.grad_accum, show_default=True, help="micro-batches per step"),
            click.option("--hidden-weight", default=R.hidden_weight, show_default=True,
                         help="token-level MSE of every block's output"),
            click.option("--logit-weight", default=R.logit_weight, show_default=True,
                         help="KL of the head's logits (models with a head)"),
            click.option("--embed-weight", default=R.embed_weight, show_default=True,
                         help="cosine distance of the pooled sentence embeddings (bare encoders)"),
            click.option("--task-weight", default=R.task_weight, show_default=True,
                         help="cross-entropy on labels ('text<TAB>label' data; classification heads)"),
            click.option("--concat", default=R.concat, show_default=True,
                         help="share of training sequences made of two passages"),
            click.option("--substitute", default=R.substitute, show_default=True,
                         help="share of tokens replaced by random vocabulary pieces"),
            click.option("--eval-every", default=R.eval_every, show_default=True, help="steps between evaluations"),
            click.option("--patience", default=R.patience, show_default=True,
                         help="evaluations without improvement before stopping early (0: never)"),
            click.option("--ckpt-every", default=R.ckpt_every, show_default=True, help="steps between checkpoints"),
            click.option("--device", type=click.Choice(["cpu", "cuda"]), default=R.device, show_default=True),
            click.option("--threads", type=int, default=None, help="CPU threads (default: all available)"),
        ]

    def deco(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


def _recover_cfg(kw, prefix: str = ""):
    from .config import RecoverConfig
    g = lambda k: kw[f"{prefix.replace('-', '_')}{k}"]          # noqa: E731
    extra = {k: kw[k] for k in ("batch_size", "grad_accum", "hidden_weight", "logit_weight", "embed_weight",
                                "task_weight", "concat", "substitute", "eval_every", "patience", "ckpt_every",
                                "device", "threads") if k in kw and not prefix}
    minutes = g("minutes") if g("minutes") is not None else (None if g("steps") else RecoverConfig.minutes)
    return RecoverConfig(data_path=str(g("data")) if g("data") else None, minutes=minutes, steps=g("steps"),
                         lr=g("lr"), seed=g("seed"), **extra)


@main.command()
@_model_arg
@click.option("--profile", "profile_path", type=click.Path(path_type=Path), required=True)
@click.option("--speedup", "-x", "targets", type=float, multiple=True, required=True, help="target; repeat for several")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="directory for the database and plans")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="where OBS runs")
@_plan_opts
@click.option("--json", "as_json", is_flag=True, help="print the plans as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
def plan(model, profile_path, targets, out, device, as_json, quiet, **kw):
    """Build the OBS database and solve for every speedup target in one DP.

    Example: planner plan ./my-bert --profile profiles/.../prefill-b8-s128-float32.json -x 1.5 -x 2 -x 3 --out run/
    """
    from . import api
    from .stages.plan import format_plan_table
    plans = api.plan(model, profile_path, _plan_cfg(targets, kw, device), out, progress=not quiet)
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in plans], indent=2, sort_keys=True))
    else:
        click.echo(format_plan_table(plans))
        click.echo(f"plans written to {out}/plan-<target>x.json")


@main.command()
@_model_arg
@click.argument("plan_path", metavar="PLAN", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="output model directory")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help="calibration text (default: the plan's)")
@click.option("--weights", type=click.Choice(["sequential", "obs", "none"]), default=None,
              help="how kept weights are fitted (default: as planned)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
@click.option("--recover", "recover_", is_flag=True, help="then distil it from MODEL (see `planner recover`)")
@_recover_opts("recover-", full=False)
def apply(model, plan_path, out, calib, weights, quiet, recover_, **kw):
    """Stitch the OBS-corrected weights, shrink the modules and save a portable Hugging Face directory.

    With --recover, the result is then distilled from MODEL before it is written (resumable like `recover`).

    Example: planner apply ./my-bert run/plan-2x.json --out my-bert-2x/ [--recover --recover-minutes 10]
    """
    from . import api
    if recover_:
        rep = api.apply_recover(model, plan_path, out, _recover_cfg(kw, "recover-"), calib_path=calib,
                                weights=weights, progress=not quiet)
        click.echo(_recover_summary(rep))
        click.echo(f"load with AutoModel.from_pretrained('{out}', trust_remote_code=True) or planner.load('{out}')")
        return
    path, m = api.apply(model, plan_path, out, calib_path=calib, weights=weights, progress=not quiet)
    from .adapters.checkpoint import n_params
    click.echo(f"{path}: {n_params(m)/1e6:.1f}M parameters; load with "
               f"AutoModel.from_pretrained('{path}', trust_remote_code=True) or planner.load('{path}')")


@main.command()
@click.argument("dense", type=click.Path(path_type=Path))
@click.argument("compressed", type=click.Path(path_type=Path))
@click.option("--text", type=click.Path(path_type=Path), default=None, help="held-out text (default: shipped)")
@click.option("--batch-size", "-b", default=VerifyConfig.batch_size, show_default=True)
@click.option("--seq-len", "-s", default=VerifyConfig.seq_len, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--reps", default=VerifyConfig.reps, show_default=True)
@click.option("--profile", "profile_path", type=click.Path(path_type=Path), default=None,
              help="predict the speedup from this profile (default: the plan recorded in the model)")
@click.option("--mode", type=click.Choice(["prefill", "decode"]), default=None,
              help="latency regime (default: the profile's or the plan's); decode: seq-len is the KV-cache length")
@click.option("--decode-steps", default=VerifyConfig.decode_steps, show_default=True,
              help="decode: greedy steps per timed generation loop")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write the report JSON here")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
def verify(dense, compressed, text, batch_size, seq_len, threads, reps, profile_path, mode, decode_steps, out, as_json,
           quiet):
    """Measure speedup (interleaved with the dense model) and quality kept on held-out text
    (causal LMs: perplexity; encoders: embedding similarity structure).

    Example: planner verify ./my-bert my-bert-2x/ --batch-size 8 --seq-len 128
    """
    from . import api
    cfg = VerifyConfig(batch_size=batch_size, seq_len=seq_len, threads=threads, reps=reps,
                       text_path=str(text) if text else None, mode=mode, decode_steps=decode_steps)
    rep = api.verify(dense, compressed, cfg, profile_path=profile_path, out=out, progress=not quiet)
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2, sort_keys=True))
        return
    pred = f"{rep.predicted_speedup:.2f}x" if rep.predicted_speedup else "n/a"
    ratio = f"{rep.prediction_ratio:.3f}" if rep.prediction_ratio else "n/a"
    q = rep.quality
    unit = "ms/token step" if rep.conditions.get("mode") == "decode" else "ms"
    click.echo(f"{rep.conditions.get('mode', 'prefill')}: dense {rep.dense_time*1e3:.2f} {unit} | compressed "
               f"{rep.compressed_time*1e3:.2f} {unit} | measured {rep.measured_speedup:.2f}x | predicted {pred} | "
               f"predicted/measured {ratio}")
    if "tokens_per_s" in q:
        click.echo(f"decode throughput: dense {q['dense_tokens_per_s']:.0f} tokens/s | compressed "
                   f"{q['tokens_per_s']:.0f} tokens/s")
    if "ppl" in q:
        click.echo(f"quality on {q['n_tokens']} held-out tokens: perplexity dense {q['ppl_dense']:.2f} | compressed "
                   f"{q['ppl']:.2f} ({q['ppl_increase']:+.1%}) | next-token agreement {q['top1_agree']:.3f}")
    else:
        click.echo(f"quality on {q['n_text']} held-out passages: cosine {q['cosine']:.3f} | spearman "
                   f"{q['spearman']:.3f} | nn_agree {q['nn_agree']:.3f}")


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--speedup", "-x", "targets", type=float, multiple=True, default=(1.5, 2.0, 3.0), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/minilm"), show_default=True)
@_profile_opts
@_plan_opts
@click.option("--no-baseline", is_flag=True, help="skip the uniform magnitude baseline")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or step messages; only the results table")
def run(model, targets, out, no_baseline, quiet, **kw):
    """The whole job: profile → plan → apply → verify (+ magnitude baseline), then a results table.

    MODEL defaults to the embedded all-MiniLM-L6-v2. Rerunning resumes from what is already in --out.

    Example: planner run --speedup 1.5 --speedup 2 --speedup 3 --batch-size 8 --seq-len 128
    """
    from .jobs.run import RunConfig, default_model, run as run_job
    model = model or default_model()
    pcfg = _profile_cfg(kw)
    cfg = RunConfig(targets=tuple(targets), profile=pcfg, plan=_plan_cfg(targets, kw, kw["device"]),
                    baseline=not no_baseline)
    run_job(model, out, cfg, quiet=quiet)


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

def _recover_summary(rep) -> str:
    def q(d):
        if "val_spearman" in d:
            return f"spearman {d['val_spearman']:.3f}, nn_agree {d['val_nn_agree']:.3f}, loss {d['val_total']:.4f}"
        return f"loss {d['val_total']:.4f}"
    return (f"{rep.out}: {rep.steps} steps ({rep.epochs:.1f} epochs) in {rep.train_time/60:.1f} min, stopped by "
            f"{rep.stop}; held-back passages: one-shot {q(rep.before)} -> recovered {q(rep.after)}")


@main.command()
@click.argument("compressed", type=click.Path(path_type=Path))
@click.option("--teacher", type=click.Path(path_type=Path), required=True, help="the dense model it was made from")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="output model directory")
@_recover_opts()
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
def recover(compressed, teacher, out, quiet, **kw):
    """Distil a compressed model from its dense teacher (token-level + head/embedding KD).

    Writes the same portable directory as `apply`, plus recover.json. A checkpoint in OUT.ckpt/ lets an
    interrupted run resume: rerun the same command. A finished run is not redone.

    Example: planner recover my-bert-2x/ --teacher ./my-bert --data my_text.txt --minutes 10 --out my-bert-2x-rec/
    """
    from . import api
    rep = api.recover(compressed, teacher, _recover_cfg(kw), out=out, progress=not quiet)
    click.echo(_recover_summary(rep))


@main.command()
@_model_arg
@click.option("--profile", "profile_path", type=click.Path(path_type=Path), required=True)
@click.option("--speedup", "-x", "targets", type=float, multiple=True, required=True,
              help="target over the dense model; repeat for several (run in increasing order)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="directory for the whole family")
@_plan_opts
@click.option("--no-recover", is_flag=True, help="no distillation between steps")
@_recover_opts("recover-", full=False)
@click.option("--reps", default=VerifyConfig.reps, show_default=True, help="interleaved timing pairs in verify")
@click.option("--quiet", "-q", is_flag=True)
def compress(model, profile_path, targets, out, no_recover, reps, quiet, **kw):
    """Gradual compression: a family of models, one per target, each planned, applied and recovered from the
    previous one (the OBS database is rebuilt on the current model; the profile is the dense model's).

    Every member is verified against the dense model; the table goes to OUT/family.md. Rerunning resumes.

    Example: planner compress ./my-bert --profile P.json -x 1.5 -x 2 -x 3 --recover-minutes 10 --out family/
    """
    from . import api
    from .jobs.compress import format_family
    from .types import LatencyProfile
    prof = LatencyProfile.load(profile_path)
    rcfg = None if no_recover else _recover_cfg(kw, "recover-")
    vcfg = VerifyConfig(batch_size=prof.batch_size, seq_len=prof.seq_len, threads=prof.hardware.get("threads"),
                        reps=reps)
    df = api.compress(model, profile_path, out, _plan_cfg(targets, kw), rcfg, vcfg, progress=not quiet)
    click.echo(format_family(df, prof))
    click.echo(f"family written to {out}/models/; table in {out}/family.md")


if __name__ == "__main__":
    main()
