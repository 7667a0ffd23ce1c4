"""train under torchrun on CPU (gloo), in the ways a cluster runs it: two "nodes" on loopback, a rank killed with
SIGKILL and the group restarted by torchrun (--max-restarts) resuming by itself, SIGTERM saving a checkpoint, and
a bare --resume that continues exactly. One story, launched once for the module (every torchrun start pays the
imports of each of its processes):

1. reference: an uninterrupted 8-step pico run on two one-process "nodes" (two torchrun agents, static rendezvous
   on 127.0.0.1);
2. faults: the same run under `torchrun --standalone --nproc-per-node 2 --max-restarts 1 ... --resume auto`; in
   the first attempt rank 1 is SIGKILLed while checkpoint-4 is being written, torchrun restarts the group, which
   resumes from checkpoint-2, and at step 6 rank 0 sends SIGTERM to torchrun (as Slurm or a spot preemption does);
3. resume: a bare `--resume` on two ranks finishes the run; every step's loss and the final weights must equal
   the reference's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, metrics
from safetensors.torch import load_file

PICO = ["--model-size", "pico", "--batch-size", "4", "--precision", "fp32", "--max-steps", "8", "--save-every", "2",
        "--eval-every", "4", "--keep-checkpoints", "10"]
LAUNCH_TIMEOUT_S = 150  # a hung collective fails the test, never the suite's budget

# `gpt2-dutch train` with faults at exact points. FAULTS="ATTEMPT:KIND:RANK:STEP,...": in torchrun's attempt
# ATTEMPT (TORCHELASTIC_RESTART_COUNT), rank RANK is SIGKILLed while it writes checkpoint STEP (sigkill), or sends
# SIGTERM to its torchrun at the end of step STEP and goes on once the forwarded signal has reached it (sigterm).
# A restarted attempt's rank 0 first records, in FAULT_LOG, what the failed attempt left in the run directory.
FAULTY = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path

    attempt, rank = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), os.environ["RANK"]
    log = Path(os.environ["FAULT_LOG"])
    if attempt != "0" and rank == "0":
        from gpt2_dutch.core.files import pid_alive

        out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
        (run,) = out.glob("gpt2-dutch-pico-2*")
        lock = run / ".lock"
        holder = int(lock.read_text().split()[0]) if lock.exists() else None
        (log / f"attempt{attempt}.json").write_text(json.dumps({
            "started_at": time.time(), "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir()),
            "lock_holder_alive": holder is not None and pid_alive(holder)}))

    from gpt2_dutch.__main__ import main
    from gpt2_dutch.train.trainer import GPT2Trainer, StopOnSignal

    for fault in filter(None, os.environ.get("FAULTS", "").split(",")):
        when, kind, who, at = fault.split(":")
        if (when, who) != (attempt, rank):
            continue
        if kind == "sigkill":
            save_rng = GPT2Trainer._save_rng_state

            def hooked(self, output_dir, at=int(at), save_rng=save_rng):
                if self.state.global_step == at:
                    (log / "killed.json").write_text(json.dumps({"at": time.time()}))
                    os.kill(os.getpid(), signal.SIGKILL)
                return save_rng(self, output_dir)

            GPT2Trainer._save_rng_state = hooked
        else:
            step_end = StopOnSignal.on_step_end

            def hooked(self, args, state, control, at=int(at), step_end=step_end, **kw):
                if state.global_step == at and self.signal is None:
                    os.kill(os.getppid(), signal.SIGTERM)
                    deadline = time.monotonic() + 30
                    while self.signal is None and time.monotonic() < deadline:
                        time.sleep(0.01)
                return step_end(self, args, state, control, **kw)

            StopOnSignal.on_step_end = hooked
    sys.exit(main(sys.argv[1:]))
""")


@dataclass
class Launch:
    rc: int
    err: str


@dataclass
class Story:
    reference: Path  # the run directory of each stage
    resumed: Path
    two_nodes: list[Launch]
    faults: Launch
    resume: Launch
    after_faults: dict  # what the faulty launch left (status, checkpoints) before the resume
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    # its own session: on a timeout the launcher and its workers go together
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True), time.monotonic()


def _wait(proc: subprocess.Popen, started: float, *others: subprocess.Popen) -> Launch:
    """The launch's exit status and stderr; past the timeout it, and `others` still running, are killed."""
    try:
        _, err = proc.communicate(timeout=max(1.0, started + LAUNCH_TIMEOUT_S - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in (proc, *others):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"a launch ran past {LAUNCH_TIMEOUT_S} s (a hung rank?):\n{err[-3000:]}")
    return Launch(proc.returncode, err)


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


@pytest.fixture(scope="module")
def story(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Story:
    root = tmp_path_factory.mktemp("multiprocess")
    script, log = root / "faulty.py", root / "log"
    script.write_text(FAULTY)
    log.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_LOG": str(log)}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    train = ["train", "--dataset-path", str(tiny_dataset), *PICO]

    port = _free_port()
    nodes = [_start(_torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(i), "--master-addr",
                              "127.0.0.1", "--master-port", str(port), "-m", "gpt2_dutch", *train, "--output-dir",
                              str(root / "reference")), env) for i in (0, 1)]
    two_nodes = [_wait(*node, *(other for other, _ in nodes)) for node in nodes]
    for launch in two_nodes:
        assert launch.rc == 0, launch.err[-3000:]

    faulty_env = {**env, "FAULTS": "0:sigkill:1:4,1:sigterm:0:6", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    faults = _wait(*_start(_torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", str(script),
                                     *train, "--output-dir", str(root / "b"), "--resume", "auto"), faulty_env))
    (resumed,) = (root / "b").glob("gpt2-dutch-pico-2*")
    after_faults = {"status": json.loads((resumed / "run_config.json").read_text())["status"],
                    "checkpoints": sorted(p.name for p in (resumed / "checkpoints").glob("checkpoint-*")),
                    "final_model": (resumed / "final_model").exists()}
    resume = _wait(*_start(_torchrun("--standalone", "--nproc-per-node", "2", "-m", "gpt2_dutch", *train,
                                     "--output-dir", str(root / "b"), "--resume"), env))
    assert resume.rc == 0, resume.err[-3000:]
    (reference,) = (root / "reference").glob("gpt2-dutch-pico-2*")
    return Story(reference, resumed, two_nodes, faults, resume, after_faults, log)


def _steps(run: Path, key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in metrics(run) if key in m]


@pytest.mark.slow
def test_two_nodes_on_loopback_train_and_publish_once(story):
    """Two torchrun agents, one process each: one run directory, written by rank 0 alone."""
    assert [p.name for p in story.reference.parent.iterdir() if not p.is_symlink()] == [story.reference.name]
    record = json.loads((story.reference / "run_config.json").read_text())
    assert (record["world_size"], record["status"]) == (2, "finished")
    assert [s for s, _ in _steps(story.reference, "loss")] == list(range(1, 9))  # each step logged once
    assert (story.reference / "final_model" / "model.safetensors").is_file()
    assert sum(launch.err.count("final model:") for launch in story.two_nodes) == 1
    assert not (story.reference / ".lock").exists()


@pytest.mark.slow
def test_a_sigkilled_rank_is_restarted_by_torchrun_from_the_last_complete_checkpoint(story):
    """Rank 1 dies while checkpoint-4 is written: rank 0 fails at once (it waits on a peer that is gone, and gloo
    says so) instead of hanging, releases the run, and leaves checkpoint-4 unpublished; the restarted group finds
    checkpoint-2, the newest complete one, by --resume auto."""
    killed = json.loads((story.log / "killed.json").read_text())
    restarted = json.loads((story.log / "attempt1.json").read_text())
    # torchrun's own teardown waits 30 s before it SIGKILLs a rank that ignores its SIGTERM
    assert restarted["started_at"] - killed["at"] < 25
    assert restarted["checkpoints"] in (["checkpoint-2"], [".staging", "checkpoint-2"])
    assert not restarted["lock_holder_alive"]
    err = story.faults.err
    assert "resuming at step 2 from" in err and f"{story.resumed}/checkpoints/checkpoint-2" in err
    assert err.count("training pico") == 2  # the first attempt and the restart, nothing more


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_a_bare_resume_continues_exactly(story):
    """SIGTERM to torchrun (forwarded to both ranks) at step 6: both save checkpoint-6 and stop with one line; a
    bare --resume then trains steps 7 and 8 exactly as the uninterrupted run did, with no step logged twice."""
    err = story.faults.err
    stops = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert len(stops) == 2 and all("at step 6" in line and "--resume" in line for line in stops)  # one per rank
    assert story.after_faults == {"status": "stopped", "final_model": False,
                                  "checkpoints": ["checkpoint-2", "checkpoint-4", "checkpoint-6"]}
    assert "resuming at step 6 from" in story.resume.err
    assert _steps(story.resumed, "loss") == _steps(story.reference, "loss")  # every step, exactly equal
    assert _steps(story.resumed, "eval_loss") == _steps(story.reference, "eval_loss")
    a = load_file(story.reference / "final_model" / "model.safetensors")
    b = load_file(story.resumed / "final_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((story.resumed / "run_config.json").read_text())["status"] == "finished"
    assert not (story.resumed / ".lock").exists() and not (story.resumed / "checkpoints" / ".staging").exists()


def test_a_restart_on_torchruns_shared_store_is_refused_in_one_line(cli, tmp_path, monkeypatch):
    """With the store shared across attempts, a restarted group could read the failed attempt's addresses: refused
    before anything is read or written."""
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    out = tmp_path / "out"
    rc, _, err = cli("train", "--dataset-path", tmp_path / "data", "--model-size", "pico", "--output-dir", out)
    assert_one_line_error(rc, err, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    assert not out.exists()
