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
