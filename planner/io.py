"""Deterministic JSON, atomic writes, schema checks, safetensors helpers.

Everything the planner writes goes to a temporary name in the same directory and is renamed into place,
so an interrupted run never leaves a half-written file behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import PlannerError


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise PlannerError(f"{path} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(dumps(obj))
    return Path(path)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise PlannerError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlannerError(f"{what} {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); "
                           f"it may be corrupted: regenerate it") from None


def _creatable(path: Path, flag: str) -> None:
    """Refuse a path whose nearest existing ancestor is not a writable directory (nothing is created)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PlannerError(f"{flag} {path}: {parent} is a file, not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PlannerError(f"{flag} {path}: {parent} is not writable; choose another {flag}")


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Before any work: `path` can be written as a file (it is not a directory, its directory can be made)."""
    path = Path(path)
    if path.is_dir():
        raise PlannerError(f"{flag} {path} is a directory; give a file name (e.g. {path / 'result.json'})")
    _creatable(path, flag)
    return path


def check_out_dir(path: str | os.PathLike, flag: str = "--out", replaceable=None, protect=()) -> Path:
    """Before any work: `path` can be made a directory. An existing file is refused; so is an existing
    directory that one of `protect` (e.g. the input model) resolves to. With `replaceable` (a predicate on the
    directory: what this command itself writes), an existing non-empty directory must satisfy it, because the
    result replaces it as a whole."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PlannerError(f"{flag} {path} is an existing file; give a directory path")
    for p in protect:
        if p is not None and path.exists() and Path(p).exists() and path.resolve() == Path(p).resolve():
            raise PlannerError(f"{flag} {path} is an input of this command; write the result to a new directory")
    if replaceable is not None and path.is_dir() and any(path.iterdir()) and not replaceable(path):
        raise PlannerError(f"{flag} {path} exists and holds something planner did not write; it would be replaced: "
                           f"choose a new directory")
    _creatable(path / "x", flag)
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name; swap it into place when the block succeeds (an existing
    directory there is replaced as a whole; an existing file is refused)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PlannerError(f"{path} is an existing file; give a directory path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)       # mkdtemp makes it private; the result should look like any mkdir
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_schema(d: dict, kind: str, version: int, path: Any = None) -> None:
    where = f" in {path}" if path else ""
    if not isinstance(d, dict) or d.get("kind") != kind:
        raise PlannerError(f"expected a {kind} JSON{where}, found "
                           f"{d.get('kind') if isinstance(d, dict) else type(d).__name__!r}")
    if d.get("schema_version") != version:
        raise PlannerError(f"{kind}{where} has schema version {d.get('schema_version')}, this planner reads "
                           f"version {version}: regenerate it with this version")


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
