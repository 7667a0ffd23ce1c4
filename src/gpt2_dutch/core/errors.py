"""The error types users see.

Anything the user can fix (a wrong flag, a missing file, an unreachable Hub) is raised as `UsageError`
with a single line saying what is wrong and what to do. A fault of the machine (a full disk) is a
`MachineError`: the same one line, exit status 1. The command-line entry point prints either without a
traceback; everything else is a bug and keeps its traceback.

The one line is the only line: a library call that can fail on the user's input (loading a tokenizer or a model,
reaching the Hub) runs inside `held_output()`, which holds what the libraries print meanwhile (their log
records, warnings, progress bars, and what native code writes to file descriptor 2) and drops it when the call
ends in a `UsageError`, so that no retry notice or load report comes before the error line.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

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
# Our progress bars appear only after this many seconds (tqdm's `delay`): an input refused in the first moments of
# a loop (a bad line near the start of a data file) is then the only line, not a bar at 0% and the error.
BAR_DELAY_S = 1.0


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


# The loggers of the libraries whose loaders we call; each has its own handler writing to stderr.
LIBRARY_LOGGERS = ("transformers", "huggingface_hub", "datasets", "tokenizers", "safetensors", "torch", "httpx",
                   "httpcore", "urllib3", "filelock", "fsspec")


@contextlib.contextmanager
def held_output() -> Iterator[None]:
    """Hold everything printed to stderr while the block runs: dropped if the block raises a `UsageError` (its
    one line says what went wrong, and nothing may come before it), written out, in the order of its kind, when
    the block ends otherwise (a success, a bug's traceback, Ctrl-C).

    Held: the records of LIBRARY_LOGGERS (passed to their own handlers afterwards, so levels and formats stay
    theirs), warnings, whatever is written to sys.stderr (tqdm bars, prints), and what native code (Rust, C)
    writes to file descriptor 2. Meant for short library calls (loading, a Hub request), not for progress a user
    should watch: it shows only when the block ends. Nests."""
    import logging
    import warnings

    records: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    hold = Hold()
    python_err = sys.stderr
    bars_back = _pause_progress_bars()
    native = _redirect_fd2()
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [hold], False
    held_text = io.StringIO()
    caught: list[warnings.WarningMessage] = []
    dropped = False
    try:
        with warnings.catch_warnings(record=True) as caught:  # the filters stay: only what would show is held
            sys.stderr = held_text
            try:
                yield
            except UsageError:
                dropped = True
                raise
            finally:
                sys.stderr = python_err
    finally:
        native_bytes = native() if native is not None else b""
        bars_back()
        for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
        if not dropped:
            python_err.write(held_text.getvalue())
            python_err.flush()
            if native_bytes:
                with contextlib.suppress(OSError):
                    os.write(2, native_bytes)
            for record in records:
                logging.getLogger(record.name).handle(record)
            for w in caught:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def _pause_progress_bars() -> Any:
    """Switch off the progress bars of the libraries already imported (a bar held until its task is over shows
    no progress, and would be printed before a later error line); returns a function that switches back on those
    that were on."""
    undo = []
    hf = sys.modules.get("transformers.utils.logging")
    if hf is not None and hf.is_progress_bar_enabled():
        hf.disable_progress_bar()
        undo.append(hf.enable_progress_bar)
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None and not hub.are_progress_bars_disabled():
        hub.disable_progress_bars()
        undo.append(hub.enable_progress_bars)
    ds = sys.modules.get("datasets.utils.logging")
    if ds is not None and ds.is_progress_bar_enabled():
        ds.disable_progress_bar()
        undo.append(ds.enable_progress_bar)

    def back() -> None:
        for switch_on in undo:
            switch_on()

    return back


def _redirect_fd2() -> Any:
    """Point file descriptor 2 at a temporary file; returns a function that points it back and gives the bytes
    written meanwhile (None where fd 2 cannot be redirected, e.g. it is closed)."""
    import tempfile

    with contextlib.suppress(AttributeError, ValueError, OSError):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        return None
    tmp = tempfile.TemporaryFile()  # noqa: SIM115 - closed by restore()
    os.dup2(tmp.fileno(), 2)

    def restore() -> bytes:
        os.dup2(saved, 2)
        os.close(saved)
        tmp.seek(0)
        data = tmp.read()
        tmp.close()
        return data

    return restore
