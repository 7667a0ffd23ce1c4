"""The error types users see.

Anything the user can fix (a wrong flag, a missing file, an unreachable Hub) is raised as `UsageError`
with a single line saying what is wrong and what to do. A fault of the machine (a full disk) is a
`MachineError`: the same one line, exit status 1. The command-line entry point prints either without a
traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import math
from collections.abc import Iterator

MAX_SEED = 2**32 - 1  # numpy's seeding (used by the Trainer and datasets) takes at most 32 bits


class UsageError(Exception):
    """A problem with the user's input or environment, reported as one line with exit status 2."""

    exit_code = 2


class MachineError(UsageError):
    """A fault of the machine (a full disk, a quota), reported as one line with exit status 1."""

    exit_code = 1


class Stopped(UsageError):
    """A run stopped on purpose (a signal) after saving its work: one line saying how to go on, no "error:"."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def check(condition: bool, message: str) -> None:
    """Raise `UsageError(message)` unless `condition` holds."""
    if not condition:
        raise UsageError(message)


def check_number(value: float | None, flag: str, *, minimum: float | None = None, maximum: float | None = None,
                 exclusive_minimum: bool = False, exclusive_maximum: bool = False) -> None:
    """A finite number within [minimum, maximum] (either end open with exclusive_minimum/exclusive_maximum); None
    passes.

    argparse accepts `inf` and `nan` for float flags; both are refused here with one line.
    """
    if value is None:
        return
    check(math.isfinite(value), f"{flag} must be a finite number (got {value})")
    if minimum is not None:
        if exclusive_minimum:
            check(value > minimum, f"{flag} must be greater than {minimum:g} (got {value:g})")
        else:
            check(value >= minimum, f"{flag} must be at least {minimum:g} (got {value:g})")
    if maximum is not None:
        if exclusive_maximum:
            check(value < maximum, f"{flag} must be less than {maximum:g} (got {value:g})")
        else:
            check(value <= maximum, f"{flag} must be at most {maximum:g} (got {value:g})")


def check_seed(seed: int | None, flag: str = "--seed") -> None:
    check(seed is None or 0 <= seed <= MAX_SEED, f"{flag} must be between 0 and {MAX_SEED} (got {seed})")


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first non-blank line, cut to `limit` characters (its type's name if it says nothing): what
    a one-line error quotes of a library's message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL


@contextlib.contextmanager
def disk_faults(what: str) -> Iterator[None]:
    """Turn a full disk (or quota) while writing `what` into a one-line MachineError (exit 1)."""
    try:
        yield
    except OSError as e:
        if is_disk_full(e):
            raise MachineError(f"no space left on the device while writing {what} ({e.strerror}); free some space "
                               "and run the same command again (nothing half-written was kept)") from None
        raise
