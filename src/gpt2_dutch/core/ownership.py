"""One writer per directory: a dataset name or a run directory has one owning process at a time.

    from gpt2_dutch.core.ownership import DirectoryOwner, die_with_parent, remove_dead_staging

    with DirectoryOwner(out_root / name, "preprocess"):      # OUT/.NAME.lock, beside the directory
        remove_dead_staging(out_root, f".{name}.tmp-")         # what a killed owner left
        ...                                                  # write OUT/NAME

    with DirectoryOwner(run_dir, "training run", lock_path=run_dir / ".lock"):   # or inside it
        ...

What the owner guarantees:

- **Atomic.** Ownership is an exclusive `fcntl.flock` on the lock file, taken without waiting. Of two processes
  started at the same instant exactly one gets it; the other gets a `UsageError` (one line, exit 2) naming the
  holder's PID (and host, where it is another), which the holder writes into the lock file right after locking.
- **Released however the holder ends.** The kernel drops a dead process's locks, SIGKILL and the OOM killer
  included; a lock file left by a killed owner is taken over by the next one. A clean release deletes the file.
  A lock file is only ever deleted by the process holding its lock, and a process that locked a file someone
  deleted meanwhile locks the new one instead, so two owners never hold two different files of one path.
- **Never held by a child.** The lock's descriptor is closed in every child forked from the owner (an at-fork
  hook: closing a copy does not release the owner's lock) and not inherited across exec (O_CLOEXEC), so a worker
  that outlives its parent cannot keep the directory locked. Workers call `die_with_parent` first thing (a
  `multiprocessing` initializer): they die when the main process dies (the kernel's PR_SET_PDEATHSIG for forked
  ones, a watcher thread for a forkserver's or spawned ones); a resume finds no orphans. Start workers from the
  main thread: Linux ties PR_SET_PDEATHSIG to the thread that forked.
- **Shared mode** (`shared=True`): several processes may hold the lock at once (the shards of one preprocess),
  and together they keep out an exclusive owner (a merge, a whole run), and it them.
- **Staging of the dead is the next owner's.** Temporary names end in the writer's PID (`files.temp_name`);
  `remove_dead_staging` deletes those whose process is gone (or has our own PID: an earlier process's leftover
  that was given our number), never one of a live process.

The lock works on local file systems and on NFS (Linux maps flock to NFS byte-range locks).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.core.files import pid_alive

# The descriptors of the locks this process holds: closed in a forked child before it runs any of our code.
_HELD: dict[int, DirectoryOwner] = {}
_PID_WAIT_S = 1.0  # how long a refused process waits for the winner to write its PID (it does so at once)


def _close_inherited_locks() -> None:
    for owner in list(_HELD.values()):
        owner._forget()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class DirectoryOwner:
    """Ownership of `directory` by this process, as a lock on `lock_path` (default `.NAME.lock` beside it).

    `what` names the kind of writer in the refusal ("another preprocess is writing ... now"); `hint` ends it
    (what the user can do). `acquire()` (or `with`) takes it or raises `UsageError`; `release()` (or leaving
    the `with`) gives it up and deletes the lock file where no other holder remains. The parent directory of
    the lock file must exist.
    """

    def __init__(self, directory: Path | str, what: str, *, lock_path: Path | str | None = None,
                 shared: bool = False, hint: str = "wait for it to end or stop it first"):
        self.directory = Path(directory)
        self.lock_path = Path(lock_path) if lock_path is not None else (
            self.directory.parent / f".{self.directory.name}.lock")
        self.what = what
        self.shared = shared
        self.hint = hint
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirectoryOwner:
        import fcntl

        if self._fd is not None:
            return self
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0),
                             0o644)
            except OSError as e:
                raise UsageError(f"cannot lock {self.directory} for this {self.what}: {self.lock_path} cannot be "
                                 f"opened ({e.strerror})") from None
            try:
                fcntl.flock(fd, mode)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UsageError(f"cannot lock {self.directory} for this {self.what}: {self.lock_path} "
                                     f"({e.strerror})") from None
                raise UsageError(f"another {self.what} is writing {self.directory} now ({self._holder_text()}); "
                                 f"{self.hint}") from None
            if _same_file(fd, self.lock_path):
                break
            os.close(fd)  # deleted by its last holder between our open and our lock: lock the new file
        self._fd = fd
        _HELD[fd] = self
        with contextlib.suppress(OSError):  # the PID is for the message of a refused process only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        return self

    def release(self) -> None:
        """Give up the lock; delete the lock file if no other process holds it (idempotent)."""
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.pop(fd, None)
        try:
            try:  # shared: only the last holder may delete the file (an exclusive holder is always the last)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except OSError:
                last = False
            if last and _same_file(fd, self.lock_path):
                with contextlib.suppress(OSError):
                    self.lock_path.unlink()
        finally:
            os.close(fd)

    def holder(self) -> tuple[int, str] | None:
        """(PID, host) of the process that wrote the lock file last: the holder while it is locked."""
        try:
            pid, host = self.lock_path.read_text(encoding="utf-8", errors="replace").split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None

    def _holder_text(self) -> str:
        deadline = time.monotonic() + _PID_WAIT_S
        while (who := self.holder()) is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the winner locked but has not written its PID yet
        if who is None:
            return f"its PID is not in {self.lock_path}"
        pid, host = who
        return f"pid {pid}" + ("" if host == socket.gethostname() else f" on {host}")

    def _forget(self) -> None:
        """In a forked child: close the inherited descriptor without touching the parent's lock or file."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryOwner:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def owned(directory: Path | str, what: str, **kwargs: object) -> DirectoryOwner:
    """`with owned(directory, "preprocess"):` -- the same as `with DirectoryOwner(directory, what, ...)`."""
    return DirectoryOwner(directory, what, **kwargs)  # type: ignore[arg-type]


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# ------------------------------------------------------------------------------------------- worker processes

def die_with_parent(parent_pid: int) -> None:
    """Make this (child) process die when `parent_pid`, the process that started the work, dies.

    Call it first in a worker (a `multiprocessing` initializer, with `os.getpid()` of the main process as the
    argument). Linux kills a child when the process that forked it dies (PR_SET_PDEATHSIG); a child of an
    intermediate process (multiprocessing's forkserver, which itself lives as long as any of its children does)
    or of a system without it gets a daemon thread that ends it when `parent_pid` ends (a pidfd where there is
    one, else a check every half second). A parent that died before the call is caught by a check after it.
    Also closes any owner lock this process inherited (the at-fork hook has already done so for forked ones).
    """
    _close_inherited_locks()
    if not (_set_pdeathsig() and os.getppid() == parent_pid):
        threading.Thread(target=_exit_when_gone, args=(parent_pid,), name="die-with-parent", daemon=True).start()
    if not pid_alive(parent_pid):
        os._exit(1)


def _exit_when_gone(pid: int) -> None:
    import select

    try:
        fd = os.pidfd_open(pid)  # readable once the process has ended: no polling, no PID reuse
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:
        while pid_alive(pid):
            time.sleep(0.5)
    os._exit(1)


def _set_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------- staging

def dead_staging(parent: Path, prefix: str) -> list[Path]:
    """The entries of `parent` named `PREFIX<pid>` (files.temp_name) whose process is gone, or whose PID is ours
    (we have not made ours yet: it is an earlier process's that had this number). Links are never listed."""
    found = []
    with contextlib.suppress(OSError):
        for path in sorted(parent.iterdir()):
            rest = path.name[len(prefix):] if path.name.startswith(prefix) else ""
            if not rest.isdigit() or path.is_symlink():
                continue
            if int(rest) == os.getpid() or not pid_alive(int(rest)):
                found.append(path)
    return found


def remove_dead_staging(parent: Path, prefix: str) -> list[Path]:
    """Delete `dead_staging(parent, prefix)`; return what was deleted. Call it while owning the directory."""
    removed = []
    for path in dead_staging(parent, prefix):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not path.exists():
            removed.append(path)
    return removed


def iter_held() -> Iterator[DirectoryOwner]:
    """The owners this process holds now (for tests and diagnostics)."""
    return iter(list(_HELD.values()))
