"""Atomic writes: a file or directory exists under its final name only once it is complete.

Every output that a later stage or a user reads (manifests, run configs, metrics, models, datasets, plots)
is written under a temporary name beside its target and renamed into place; a kill or a full disk at any
moment leaves either the old complete file or the new complete one, never half of either.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def temp_name(path: Path, tag: str = "tmp") -> Path:
    """A hidden sibling of `path` unique to this process: `.name.tmp-PID`."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON (indented, UTF-8, strict: NaN and infinities are refused, not written as invalid JSON)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def replace_symlink(link: Path, target: str) -> None:
    """Point the symbolic link `link` at `target` with one rename: it always names a complete target, never
    a missing link in between (as unlink-then-symlink would leave)."""
    link = Path(link)
    tmp = temp_name(link)
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete directory `tmp` to `final`, replacing what is there with one rename where possible.

    The old directory is renamed aside first and deleted only once the new one is in place, so a failure at
    any point leaves one complete directory under `final` (or, at worst, the old one beside it, never deleted).
    """
    if not final.exists() and not final.is_symlink():
        tmp.rename(final)
        return
    trash = temp_name(final, "old")
    final.rename(trash)
    try:
        tmp.rename(final)
    except BaseException:
        trash.rename(final)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (for cleaning up after killed runs). A zombie (dead,
    not yet reaped by its parent) is not alive: it writes nothing any more."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # not a PID this system can have
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone meanwhile, or no /proc (macOS: kill(pid, 0) is all there is to know)
        return not Path("/proc/self").exists()
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X")
