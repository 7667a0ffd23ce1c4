"""The one error type users see.

Anything the user can fix (a wrong flag, a missing file, an unreachable Hub) is raised as `UsageError`
with a single line saying what is wrong and what to do. The command-line entry point prints it without a
traceback and exits with status 2; everything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """A problem with the user's input or environment, reported as one line with exit status 2."""

    exit_code = 2


def check(condition: bool, message: str) -> None:
    """Raise `UsageError(message)` unless `condition` holds."""
    if not condition:
        raise UsageError(message)
