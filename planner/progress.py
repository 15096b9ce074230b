"""Progress bars: shown on an interactive terminal, quiet under --quiet and in non-interactive runs.

`PLANNER_PROGRESS=1` forces bars on (e.g. to follow a long job's log), `PLANNER_PROGRESS=0` forces them off.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm  # not tqdm.auto: bars are off in notebooks (no TTY), so no widget warning


def enabled(progress: bool = True) -> bool:
    """Whether a step asked to show progress should draw a bar here."""
    if not progress:
        return False
    env = os.environ.get("PLANNER_PROGRESS", "").strip().lower()
    if env in ("1", "true", "yes", "always"):
        return True
    if env in ("0", "false", "no", "never"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):             # closed or replaced stderr
        return False


def bar(iterable=None, *, progress: bool = True, **kw) -> tqdm:
    """tqdm that draws only where `enabled(progress)`; same arguments as tqdm otherwise."""
    return tqdm(iterable, disable=not enabled(progress), dynamic_ncols=True, **kw)
