"""Write docs/reference.md from the CLI and the API themselves, so the reference cannot drift from the code:

    python docs/make_reference.py            # rewrite docs/reference.md
    python docs/make_reference.py --check    # exit 1 if it is out of date (tests/test_flags.py runs this check)
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

import planner
from planner.cli import main

OUT = Path(__file__).resolve().parent / "reference.md"
API = ("profile", "plan", "apply", "verify", "recover", "apply_recover", "compress", "run", "report", "load",
       "build_database")


def _default(o: click.Option) -> str:
    if o.is_flag and not o.secondary_opts:
        return ""
    d = o.default
    if o.required or d is None or d == () or not isinstance(d, (int, float, str, bool, tuple, list)):
        return ""                                    # click's own "unset" sentinels differ between releases
    if isinstance(d, (tuple, list)):
        return ", ".join(map(str, d))
    return str(d)


def _flags(o: click.Option) -> str:
    names = [*o.opts, *o.secondary_opts]
    return " / ".join(f"`{n}`" for n in names)


def command_section(name: str, cmd: click.Command) -> list[str]:
    doc = inspect.cleandoc(cmd.help or "").replace("\b\n", "")
    usage = " ".join(p.human_readable_name for p in cmd.params if isinstance(p, click.Argument))
    lines = [f"### planner {name}", "", f"`planner {name} {usage} [OPTIONS]`".replace("  ", " "), "", doc, "",
             "| option | default | what it does |", "|---|---|---|"]
    for o in cmd.params:
        if isinstance(o, click.Option) and not o.hidden:
            req = " (required)" if o.required else ""
            help_ = (o.help or "").replace("|", "\\|") + req
            lines.append(f"| {_flags(o)} | {_default(o)} | {help_} |")
    return lines + [""]


def render() -> str:
    lines = ["# Reference", "",
             "Generated from the code by `python docs/make_reference.py`; every option comes from a field of a config "
             "dataclass in `planner/config.py`, where its default lives.", "", "## Command line", ""]
    for name in sorted(main.commands):
        lines += command_section(name, main.commands[name])
    lines += ["## Python API", "", "`import planner`; configs are frozen dataclasses with the same fields as the "
              "flags (`planner.PlanConfig(targets=(2.0,), damp=0.01)`), results are dataclasses with `save` / "
              "`load` JSON round trips (see formats.md).", ""]
    for name in API:
        fn = getattr(planner, name)
        sig = str(inspect.signature(fn)).replace("planner.config.", "")
        doc = inspect.getdoc(fn) or ""
        lines += [f"### planner.{name}", "", f"```python\nplanner.{name}{sig}\n```", "", doc, ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")
