"""One exception type for everything a user can fix.

The CLI turns a PlannerError into a one-line message and exit code 2; anything else is a bug and keeps
its traceback.
"""


class PlannerError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""


class UnsupportedModel(PlannerError):
    pass


class ProfileMismatch(PlannerError):
    pass


class UnreachableTarget(PlannerError):
    pass


class PlannerWarning(UserWarning):
    """Something the user should know that does not stop the work (a noisy machine, a far-off calibration text)."""


def warn(msg: str) -> None:
    """One warning line (no source line under it); filter it like any warning (-W ignore::...PlannerWarning)."""
    import warnings
    warnings.warn_explicit(msg, PlannerWarning, filename="planner", lineno=0, module="planner")


def os_error_message(e: OSError) -> str:
    """One line for an OSError met while reading or writing: what failed, where, and what to do. Every file
    planner writes goes to a temporary name first, so nothing half-written is left behind."""
    import errno
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    advice = {errno.ENOSPC: "no space left on the device{w}: free some space or write to another disk (--out); "
                            "nothing was left half-written",
              errno.EDQUOT: "disk quota exceeded{w}: free some space or write elsewhere (--out); nothing was left "
                            "half-written",
              errno.EACCES: "permission denied{w}: choose a directory you can write to",
              errno.EPERM: "operation not permitted{w}: choose a directory you can write to",
              errno.EROFS: "read-only file system{w}: write to another place (--out)",
              errno.ENOENT: "no such file or directory{w}: check the path",
              errno.ENOTDIR: "a path component is a file, not a directory{w}: check the path",
              errno.EISDIR: "is a directory{w}: give a file name"}
    msg = advice.get(e.errno)
    return msg.format(w=where) if msg else f"{e.strerror or type(e).__name__}{where}"
