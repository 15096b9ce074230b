"""The torch and transformers releases planner is tested on, and a one-line warning outside that range.

The ranges themselves are declared once, in pyproject.toml (`dependencies`); this module reads them back from
the installed package's metadata, so the warning and the install can never disagree. `TESTED` names the
releases the whole test suite passed on (CI runs the newest the registry serves and the oldest declared).
"""
from __future__ import annotations

import warnings
from importlib import metadata

# the releases the whole suite passed on, oldest and newest (README: "Tested with")
TESTED = {"torch": ("2.13.0",), "transformers": ("5.0.0", "5.24.0")}
CHECKED = ("torch", "transformers")


class PlannerVersionWarning(UserWarning):
    """An installed torch or transformers outside the range planner declares (and was tested on)."""


def declared_ranges() -> dict[str, str]:
    """{package: specifier} for torch and transformers as the installed planner declares them ({} when planner
    runs from a source tree that was never installed, which has no metadata)."""
    from packaging.requirements import Requirement
    try:
        reqs = metadata.requires("planner") or []
    except metadata.PackageNotFoundError:
        return {}
    out = {}
    for line in reqs:
        r = Requirement(line)
        if r.name in CHECKED and r.marker is None:
            out[r.name] = str(r.specifier)
    return out


def outside_range(installed: dict[str, str], ranges: dict[str, str]) -> list[tuple[str, str, str]]:
    """(package, installed version, declared specifier) for every installed package outside its declared range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
    out = []
    for name, spec in sorted(ranges.items()):
        v = installed.get(name)
        if v is None or not spec:
            continue
        try:
            ok = SpecifierSet(spec).contains(Version(v), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            out.append((name, v, spec))
    return out


def warn_if_outside(installed: dict[str, str] | None = None, ranges: dict[str, str] | None = None) -> str | None:
    """Emit one PlannerVersionWarning line naming every package outside its declared range; returns the message
    (None: all inside). Filter it like any warning (`-W ignore::planner.versions.PlannerVersionWarning`)."""
    if installed is None:
        import torch
        import transformers
        installed = {"torch": torch.__version__, "transformers": transformers.__version__}
    bad = outside_range(installed, declared_ranges() if ranges is None else ranges)
    if not bad:
        return None
    tested = "; ".join(f"{k} {', '.join(v)}" for k, v in TESTED.items())
    what = " and ".join(f"{n} {v} (planner declares {s})" for n, v, s in bad)
    fix = " ".join(f"'{n}{s}'" for n, _, s in bad)
    msg = f"{what}: outside the tested range (tested: {tested}); results may differ: pip install {fix}"
    # warn_explicit with no source line: the warning is one line, not two
    warnings.warn_explicit(msg, PlannerVersionWarning, filename="planner", lineno=0, module="planner")
    return msg
