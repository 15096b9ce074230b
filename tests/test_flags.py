"""One home for every default: every config field has a flag whose default is the field's, and every flag the
README, the docs or an error message names exists."""
import dataclasses
import re
from pathlib import Path

import click
import pytest

from planner import cli
from planner.cli import COMMAND_CONFIGS, main
from planner.config import ApplyConfig, PlanConfig, ProfileConfig, RecoverConfig, VerifyConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (ProfileConfig, PlanConfig, VerifyConfig, RecoverConfig, ApplyConfig)


def _options(cmd: click.Command) -> dict[str, click.Option]:
    return {name: o for o in cmd.params if isinstance(o, click.Option) for name in (*o.opts, *o.secondary_opts)}


def _all_flags() -> set[str]:
    flags = {"--help", "--version"}
    for cmd in main.commands.values():
        flags |= set(_options(cmd))
    return flags


def test_every_config_field_has_a_flag_with_its_default():
    reached = {cls: set() for cls in CONFIGS}
    for name, exposed in COMMAND_CONFIGS.items():
        opts = _options(main.commands[name])
        for cls, prefix, exclude in exposed:
            for f in dataclasses.fields(cls):
                if f.name in exclude:
                    continue
                flag = f"--{prefix}{f.metadata.get('flag', f.name.replace('_', '-'))}"
                assert flag in opts, f"{name}: {cls.__name__}.{f.name} has no {flag}"
                o, default = opts[flag], (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                if not f.metadata.get("invert") and not o.required:
                    got = o.default if not o.multiple else tuple(o.default or ())
                    assert got == default, f"{name} {flag}: default {got!r}, {cls.__name__} says {default!r}"
                assert o.help == f.metadata["help"], flag
                reached[cls].add(f.name)
    for cls in CONFIGS:
        missing = {f.name for f in dataclasses.fields(cls)} - reached[cls]
        assert not missing, f"{cls.__name__} fields no command reaches: {missing}"


def test_a_generated_command_builds_the_configs_it_shows():
    """Flags land in the right field: the CLI's parse of `planner plan` equals the config built directly."""
    seen = {}
    orig = cli.config_from

    def spy(cls, kw, *a, **k):
        seen[cls] = orig(cls, kw, *a, **k)
        return seen[cls]
    pytest.MonkeyPatch().setattr(cli, "config_from", spy)
    try:
        ctx = main.commands["plan"].make_context("plan", ["m", "--profile", "p", "--out", "o", "-x", "2", "-x", "3",
                                                         "--damp", "0.05", "--buckets", "500", "--sparse-only",
                                                         "--no-sequential", "--calib", "c.txt"])
        kw = {k: v for k, v in ctx.params.items() if k not in ("model", "profile_path", "out", "as_json", "quiet")}
        got = cli.config_from(PlanConfig, kw)
    finally:
        pytest.MonkeyPatch().undo()
    assert got == PlanConfig(targets=(2.0, 3.0), damp=0.05, n_buckets=500, structured=False, sequential=False,
                             calib_path="c.txt")


def _benchmark_flags() -> set[str]:
    """Flags of the benchmark scripts (argparse or click), which the docs quote next to the CLI's."""
    return {f for p in (ROOT / "benchmarks").glob("*.py")
            for f in re.findall(r"(?:add_argument|click\.option)\(\s*\"(--[a-z0-9-]+)\"", p.read_text())}


def _named_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text))


def test_flags_named_in_docs_exist():
    flags = _all_flags() | _benchmark_flags()
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    # flags of other tools that the docs quote
    foreign = {"--upgrade", "--no-sandbox", "--headless", "--threads-per-core", "--break-system-packages",
               "--durations", "--index-url", "--extra-index-url", "--pre", "--no-deps",
               "--nproc-per-node", "--standalone"}                            # torchrun's
    for doc in docs:
        unknown = _named_flags(doc.read_text()) - flags - foreign
        assert not unknown, f"{doc.name} names flags no command has: {sorted(unknown)}"


def test_flags_named_in_error_messages_exist():
    flags = _all_flags()
    unknown = {}
    for p in sorted((ROOT / "planner").rglob("*.py")):
        for s in re.findall(r"[fr]?\"(?:[^\"\\]|\\.)*\"", p.read_text()):
            for flag in _named_flags(s) - flags:
                unknown.setdefault(flag, p.name)
    unknown.pop("--trust-remote-code", None)
    unknown.pop("--nproc-per-node", None)                                          # torchrun's, in distributed.py
    assert not unknown, f"messages name flags no command has: {unknown}"


def test_the_reference_is_generated_from_the_code():
    """docs/reference.md is what docs/make_reference.py renders from the CLI and the API today."""
    import runpy
    ref = runpy.run_path(str(ROOT / "docs" / "make_reference.py"))
    assert (ROOT / "docs" / "reference.md").read_text() == ref["render"](), \
        "docs/reference.md is out of date: run python docs/make_reference.py"
