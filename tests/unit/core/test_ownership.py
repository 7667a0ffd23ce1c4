"""core/ownership.py: one writer per directory. Atomic (exactly one of two wins, the other is told the PID),
released however the holder dies, never kept by a child, workers die with their parent, dead staging removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpt2_dutch.core import ownership
from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.core.files import pid_alive
from gpt2_dutch.core.ownership import DirectoryOwner, dead_staging, owned, remove_dead_staging

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks processes through /proc")


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc is None or proc.poll() is None, proc.communicate() if proc else ""
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pid_alive(pid)


# --------------------------------------------------------------------------------------------- in one process
# flock locks belong to an open file, so two owners in one process exclude each other as two processes would.

def test_a_second_owner_is_refused_in_one_line_naming_the_holder(tmp_path):
    with owned(tmp_path / "x", "preprocess") as first:
        assert first.held and first.lock_path == tmp_path / ".x.lock"
        assert first.lock_path.read_text().split()[0] == str(os.getpid())
        with pytest.raises(UsageError) as e:
            DirectoryOwner(tmp_path / "x", "preprocess").acquire()
        msg = str(e.value)
        assert msg == (f"another preprocess is writing {tmp_path / 'x'} now (pid {os.getpid()}); wait for it to end "
                       "or stop it first") and "\n" not in msg
    assert not first.held and not (tmp_path / ".x.lock").exists(), "a clean release deletes the lock file"
    with owned(tmp_path / "x", "preprocess"):  # free again
        pass


@pytest.mark.parametrize(("first", "second", "refused"), [
    (True, True, False),  # shards of one preprocess: together
    (True, False, True),  # a merge while a shard writes
    (False, True, True),  # a shard while a whole run writes
    (False, False, True),
], ids=["shared-shared", "shared-then-exclusive", "exclusive-then-shared", "exclusive-exclusive"])
def test_shared_and_exclusive(tmp_path, first, second, refused):
    a = DirectoryOwner(tmp_path / "x", "preprocess", shared=first).acquire()
    b = DirectoryOwner(tmp_path / "x", "preprocess", shared=second)
    if refused:
        with pytest.raises(UsageError, match="another preprocess is writing"):
            b.acquire()
    else:
        b.acquire()
        b.release()
        assert (tmp_path / ".x.lock").exists(), "a shared holder leaves the file while another holds it"
    a.release()
    assert not (tmp_path / ".x.lock").exists(), "the last holder deletes the file"


def test_a_lock_file_left_by_a_killed_owner_is_taken_over(tmp_path):
    (tmp_path / ".x.lock").write_text("999999999 somewhere\n")  # not locked: its holder is gone
    with owned(tmp_path / "x", "preprocess", lock_path=tmp_path / ".x.lock") as o:
        assert o.holder() == (os.getpid(), os.uname().nodename)


def test_a_holder_that_wrote_no_pid_yet_is_still_named_in_one_line(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(ownership, "_PID_WAIT_S", 0.05)
    fd = os.open(tmp_path / ".x.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(UsageError, match=r"now \(its PID is not in .*\.x\.lock\); wait"):
            DirectoryOwner(tmp_path / "x", "train run").acquire()
    finally:
        os.close(fd)


def test_a_lock_file_that_cannot_be_made_is_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"cannot lock .*missing/x for this preprocess: .* cannot be opened"):
        DirectoryOwner(tmp_path / "missing" / "x", "preprocess").acquire()


# ------------------------------------------------------------------------------------------- across processes

RACER = """
    import os, sys, time
    from pathlib import Path
    from gpt2_dutch.core.errors import UsageError
    from gpt2_dutch.core.ownership import DirectoryOwner
    d = Path(sys.argv[1])
    while not (d / "go").exists():
        pass
    try:
        owner = DirectoryOwner(d / "x", "preprocess").acquire()
    except UsageError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    print("won", flush=True)
    while not (d / "done").exists():
        time.sleep(0.01)
    owner.release()
"""


@pytest.mark.slow
def test_of_two_started_at_the_same_instant_exactly_one_wins_and_the_other_names_it(tmp_path):
    procs = [_python(RACER, str(tmp_path)) for _ in range(2)]
    time.sleep(1.0)  # both interpreters started and spinning
    (tmp_path / "go").touch()
    deadline = time.monotonic() + 20
    while sum(p.poll() is not None for p in procs) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "done").touch()
    results = [(p.pid, p.wait(20), *p.communicate()) for p in procs]
    winners = [r for r in results if r[1] == 0]
    losers = [r for r in results if r[1] == 2]
    assert len(winners) == 1 and len(losers) == 1, results
    assert winners[0][2] == "won\n"
    assert losers[0][3] == (f"another preprocess is writing {tmp_path / 'x'} now (pid {winners[0][0]}); wait for it "
                            "to end or stop it first\n")


HOLDER = """
    import os, sys, time
    from pathlib import Path
    from gpt2_dutch.core.ownership import DirectoryOwner
    d = Path(sys.argv[1])
    DirectoryOwner(d / "x", "preprocess").acquire()
    if sys.argv[2] == "fork":  # a child that outlives us, forked while we hold the lock
        if os.fork() == 0:
            (d / "child").write_text(str(os.getpid()))
            time.sleep(60)
            os._exit(0)
        while not (d / "child").exists():
            time.sleep(0.01)
    (d / "ready").touch()
    time.sleep(60)
"""


@linux_only
@pytest.mark.slow
@pytest.mark.parametrize("child", ["none", "fork"])
def test_the_lock_goes_with_a_sigkilled_holder_and_no_child_keeps_it(tmp_path, child):
    proc = _python(HOLDER, str(tmp_path), child)
    _wait_for(tmp_path / "ready", proc)
    with pytest.raises(UsageError, match=f"pid {proc.pid}"):
        DirectoryOwner(tmp_path / "x", "preprocess").acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    child_pid = int((tmp_path / "child").read_text()) if child == "fork" else None
    try:
        if child_pid is not None:
            assert pid_alive(child_pid), "the forked child outlives its parent here (no die_with_parent)"
        with owned(tmp_path / "x", "preprocess") as o:  # taken at once: nothing holds it any more
            assert o.held
    finally:
        if child_pid is not None:
            os.kill(child_pid, signal.SIGKILL)


POOL = """
    import multiprocessing, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from pathlib import Path
    from gpt2_dutch.core.ownership import DirectoryOwner, die_with_parent

    def job(d):
        (Path(d) / f"worker-{os.getpid()}").touch()
        time.sleep(60)

    if __name__ == "__main__":
        d = Path(sys.argv[1])
        DirectoryOwner(d / "x", "preprocess").acquire()
        pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(sys.argv[2]),
                                   initializer=die_with_parent, initargs=(os.getpid(),))
        for _ in range(2):
            pool.submit(job, str(d))
        while len(list(d.glob("worker-*"))) < 2:
            time.sleep(0.01)
        os.kill(os.getpid(), 9)
"""


@linux_only
@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_workers_die_with_their_parent_and_free_the_lock(tmp_path, method):
    script = tmp_path / "pool.py"
    script.write_text(textwrap.dedent(POOL))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), method], start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    assert proc.wait(60) == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
    assert len(workers) == 2
    survivors = [pid for pid in workers if not _wait_dead(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], "workers outlived their parent"
    with owned(tmp_path / "x", "preprocess"):
        pass


# ---------------------------------------------------------------------------------------------------- staging

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_the_staging_of_dead_processes_and_of_our_own_pid_is_removed(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    for name in (f".x.tmp-{dead}", f".x.tmp-{os.getpid()}", f".x.tmp-{live}", ".x.tmp-abc", f".y.tmp-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part").write_text("half")
    (tmp_path / f".x.tmp-{dead}0").write_text("a file")  # another dead PID, a file: removed too
    (tmp_path / f".x.tmp-{dead}1").symlink_to(tmp_path / ".y.tmp-1", target_is_directory=True)  # a link: never
    expect = sorted([tmp_path / f".x.tmp-{dead}", tmp_path / f".x.tmp-{dead}0", tmp_path / f".x.tmp-{os.getpid()}"])
    if pid_alive(dead * 10):  # the number was given to a live process meanwhile: not dead
        expect.remove(tmp_path / f".x.tmp-{dead}0")
    assert dead_staging(tmp_path, ".x.tmp-") == expect
    assert remove_dead_staging(tmp_path, ".x.tmp-") == expect
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {f".x.tmp-{live}", ".x.tmp-abc", f".y.tmp-{dead}", f".x.tmp-{dead}1"} | {p.name for p in expect} - {
            p.name for p in expect})


@linux_only
def test_a_zombie_is_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert not pid_alive(proc.pid)  # exited, not yet reaped: writes nothing any more
    finally:
        proc.wait()
    assert pid_alive(os.getpid()) and not pid_alive(0) and not pid_alive(-1) and not pid_alive(2**70)
