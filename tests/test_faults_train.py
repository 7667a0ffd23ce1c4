"""train's fault matrix: finished runs are never changed by --resume, preemption saves and resumes exactly,
diverged or empty runs are never published, every bad input is one line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from safetensors.torch import load_file

from gpt2_dutch.train import TrainConfig, train
from gpt2_dutch.train.runs import create_run_dir, run_status

TINY = ["--model-size", "tiny", "--batch-size", "4", "--precision", "fp32"]


def tiny_cfg(dataset: Path, out: Path, **kw) -> TrainConfig:
    base = dict(dataset_path=str(dataset), model_size="tiny", batch_size=4, precision="fp32", output_dir=str(out))
    base.update(kw)
    return TrainConfig(**base)


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under `path` with the hash of its bytes: equal digests mean nothing was changed."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run of 4 steps with checkpoints at 2 and 4 (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("finished")
    return train(tiny_cfg(tiny_dataset, out, max_steps=4, save_every=2, eval_every=4))


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "runs"
    out.mkdir()
    copy = out / finished_run.name
    shutil.copytree(finished_run, copy, symlinks=True)
    (out / "gpt2-dutch-tiny-latest").symlink_to(copy.name)
    return copy


# ----------------------------------------------------------------------------- the table of one-line failures

def _corrupt_newest_checkpoint(run: Path) -> str:
    (run / "checkpoints" / "checkpoint-4" / "model.safetensors").write_bytes(b"\x00" * 100)
    return str(run / "checkpoints" / "checkpoint-4")


def _pickle_checkpoint(run: Path) -> str:
    ckpt = run / "checkpoints" / "checkpoint-4"
    state = load_file(ckpt / "model.safetensors")
    torch.save(state, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    return str(ckpt)


BAD = [
    # (id, extra arguments; "{run}" is a copy of a finished run, "{ckpt}" what the setup function returns, message)
    pytest.param(["--learning-rate", "inf"], None, "--learning-rate must be a finite number", id="lr-inf"),
    pytest.param(["--learning-rate", "nan"], None, "--learning-rate must be a finite number", id="lr-nan"),
    pytest.param(["--epochs", "inf"], None, "--epochs must be a finite number", id="epochs-inf"),
    pytest.param(["--epochs", "-1"], None, "--epochs must be positive", id="epochs-negative"),
    pytest.param(["--max-tokens", "inf"], None, "--max-tokens must be a finite number", id="max-tokens-inf"),
    pytest.param(["--max-tokens", "0"], None, "--max-tokens must be positive", id="max-tokens-zero"),
    pytest.param(["--warmup", "nan"], None, "--warmup must be a finite number", id="warmup-nan"),
    pytest.param(["--warmup", "-1"], None, "--warmup must be at least 0", id="warmup-negative"),
    pytest.param(["--weight-decay", "inf"], None, "--weight-decay must be a finite number", id="weight-decay-inf"),
    pytest.param(["--seed", "-1"], None, "--seed must be between 0 and 4294967295", id="seed-negative"),
    pytest.param(["--seed", str(2**40)], None, "--seed must be between 0 and 4294967295", id="seed-beyond-2**32"),
    pytest.param(["--batch-size", "0"], None, "--batch-size must be positive", id="batch-size-zero"),
    pytest.param(["--batch-size", str(10**9)], None, "fewer than one optimizer step needs",
                 id="batch-size-huge-zero-steps"),
    pytest.param(["--batch-size", "1000"], None, "fewer than one optimizer step needs",
                 id="batch-larger-than-split-with-max-steps"),
    pytest.param(["--gradient-accumulation-steps", str(10**12)], None, "fewer than one optimizer step needs",
                 id="accumulation-huge"),
    pytest.param(["--num-workers", str(10**6)], None, "--num-workers must be between 0 and 256",
                 id="num-workers-huge"),
    pytest.param(["--max-steps", "0"], None, "--max-steps must be positive", id="max-steps-zero"),
    pytest.param(["--max-time", "inf"], None, "is not a positive duration", id="max-time-inf"),
    pytest.param(["--eval-chunks", "-1"], None, "--eval-chunks must be >= 0", id="eval-chunks-negative"),
    pytest.param(["--resume", "{run}"], None, "is finished (step 4) and is never changed by --resume alone",
                 id="resume-finished-run"),
    pytest.param(["--resume"], None, "is finished (step 4) and is never changed by --resume alone",
                 id="bare-resume-only-finished-runs"),
    pytest.param(["--resume", "{run}", "--max-steps", "3"], None, "--max-steps N with N > 4",
                 id="resume-finished-run-max-steps-not-beyond"),
    pytest.param(["--resume", "{ckpt}", "--max-steps", "8"], _corrupt_newest_checkpoint,
                 "model.safetensors is damaged", id="resume-explicit-corrupt-checkpoint"),
    pytest.param(["--resume", "{ckpt}", "--max-steps", "8"], _pickle_checkpoint,
                 "its weights are a pickle (pytorch_model.bin), which is never loaded", id="resume-pickle-checkpoint"),
    pytest.param(["--resume", "{run}", "--init-from", "{run}"], None, "not both", id="resume-and-init-from"),
    pytest.param(["--init-from", "{run}/checkpoints"], None, "not a model, run or checkpoint directory",
                 id="init-from-not-a-model"),
]


@pytest.mark.parametrize("args, setup, message", BAD)
def test_bad_input_is_one_line_and_changes_nothing(args, setup, message, tiny_dataset, run_copy, cli):
    ckpt = setup(run_copy) if setup else ""
    before = tree_digest(run_copy.parent)
    argv = [a.replace("{run}", str(run_copy)).replace("{ckpt}", ckpt) for a in args]
    if "--max-steps" not in argv:
        argv += ["--max-steps", "2"]
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", run_copy.parent, *argv)
    assert_one_line_error(rc, err, message)
    assert tree_digest(run_copy.parent) == before  # nothing written, nothing deleted, no new run directory


def test_an_argument_that_is_not_utf8_is_one_line(cli):
    bad = os.fsdecode(b"/tmp/data-\xff")  # how Python hands over undecodable bytes in argv
    rc, _, err = cli("train", "--dataset-path", bad)
    assert_one_line_error(rc, err, "is not valid UTF-8")


def test_init_from_a_model_of_another_shape_is_refused(tiny_dataset, run_copy, cli, tmp_path):
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, "--model-size", "small", "--batch-size", "4",
                     "--init-from", run_copy, "--output-dir", tmp_path / "o", "--max-steps", "1")
    assert_one_line_error(rc, err, "does not fit this run (n_layer 4 vs 12")


# ----------------------------------------------------------------------------- finished runs and extension

def test_a_finished_run_grows_only_with_a_larger_max_steps_and_says_so(tiny_dataset, run_copy):
    old_final = (run_copy / "final_model" / "model.safetensors").read_bytes()
    run = train(tiny_cfg(tiny_dataset, run_copy.parent, resume=str(run_copy), max_steps=6, save_every=2))
    assert run == run_copy.resolve()
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["total_steps"] == 6 and saved["status"] == "finished"
    assert saved["extensions"] == [{"from_step": 4, "to_step": 6}]
    assert (run / "final_model" / "model.safetensors").read_bytes() != old_final
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # no repeated rows


def test_init_from_starts_a_new_run_from_the_weights(tiny_dataset, run_copy, tmp_path):
    run = train(tiny_cfg(tiny_dataset, tmp_path / "o", init_from=str(run_copy), max_steps=1, learning_rate=1e-9,
                         warmup=0))
    start = load_file(run_copy / "final_model" / "model.safetensors")
    after = load_file(run / "final_model" / "model.safetensors")
    assert run != run_copy and json.loads((run / "run_config.json").read_text())["init_from"] == str(run_copy)
    # one step at lr 1e-9 moves the weights by ~1e-9: they are the source's, not random ones
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in start)


# ----------------------------------------------------------------------------- health checks

@pytest.mark.slow
def test_a_diverged_run_is_not_published_and_exits_nonzero(tiny_dataset, tmp_path, cli):
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path, "--max-steps", "12",
                     "--learning-rate", "1e6")
    assert_one_line_error(rc, err, "training diverged: 5 steps in a row had a non-finite loss or gradient")
    run = next(tmp_path.glob("gpt2-dutch-tiny-2*"))
    assert not (run / "final_model").exists() and not (tmp_path / "gpt2-dutch-tiny-latest").exists()
    assert run_status(run) == "diverged"
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))  # strict JSON
    for ckpt in (run / "checkpoints").glob("checkpoint-*"):  # no checkpoint holds NaN weights
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())


@pytest.mark.slow
def test_a_single_nonfinite_step_is_skipped_and_the_run_goes_on(tiny_dataset, tmp_path, monkeypatch, capsys):
    from transformers import GPT2LMHeadModel

    forward = GPT2LMHeadModel.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # the third training step's loss becomes NaN
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(GPT2LMHeadModel, "forward", poisoned)
    run = train(tiny_cfg(tiny_dataset, tmp_path, max_steps=6, log_every=1))
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row" in capsys.readouterr().err
    weights = load_file(run / "final_model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 0, 1, 1, 1, 1]
    assert all(r["loss"] is not None and r["loss"] < 6 for r in rows)


# ----------------------------------------------------------------------------- run names, disk full

def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    now = datetime(2026, 1, 2, 3, 4, 5)
    a, b, c = (create_run_dir(tmp_path, "tiny", now) for _ in range(3))
    assert [p.name for p in (a, b, c)] == ["gpt2-dutch-tiny-20260102-030405", "gpt2-dutch-tiny-20260102-030405-2",
                                          "gpt2-dutch-tiny-20260102-030405-3"]


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_nothing_half_written(tiny_dataset, tmp_path, cli,
                                                                                    monkeypatch):
    import transformers.modeling_utils as modeling_utils

    real = modeling_utils.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "checkpoint-4" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path, "--max-steps", "6",
                     "--save-every", "2")
    assert_one_line_error(rc, err, "no space left on the device", code=1)
    run = next(tmp_path.glob("gpt2-dutch-tiny-2*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]  # no staging left
    assert not (run / "final_model").exists() and run_status(run) == "failed"


# ----------------------------------------------------------------------------- preemption

def _train_cmd(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpt2_dutch", "train", "--dataset-path", str(dataset), *TINY,
            "--output-dir", str(out), "--max-steps", "24", "--save-every", "100", "--eval-every", "12",
            "--log-every", "1", *extra]


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen) -> Path:
    deadline = time.time() + 120
    while time.time() < deadline:
        for metrics in out.glob("*/metrics.jsonl"):
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.endswith("}")]
            if steps and max(steps) >= step:
                return metrics.parent
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be stopped: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    pytest.fail("the run never reached the step")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_saves_a_checkpoint_and_a_bare_resume_ends_bit_identical(signum, tiny_dataset, tmp_path):
    """Preemption: the signal is handled at the next step boundary (no --save-every checkpoint exists before
    it), `--resume` without a value finds the stopped run, and the final weights equal an uninterrupted run's."""
    subprocess.run(_train_cmd(tiny_dataset, tmp_path / "a"), check=True, capture_output=True)
    # an older finished run in the same output dir must not be what a bare --resume picks
    subprocess.run(_train_cmd(tiny_dataset, tmp_path / "b", "--max-steps", "2"), check=True, capture_output=True)
    proc = subprocess.Popen(_train_cmd(tiny_dataset, tmp_path / "b"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.1)  # names go down to the second; the older run above is then certainly older
    run_b = _wait_for_step(tmp_path / "b", 5, proc)
    os.kill(proc.pid, signum)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signum, err[-2000:]
    name = signal.Signals(signum).name
    last = err.strip().splitlines()[-1]
    assert f"stopped by {name} at step" in last and "--resume" in last and "Traceback" not in err
    stopped_at = int(last.split(" at step ")[1].split(";")[0])
    assert 5 <= stopped_at < 24
    assert [p.name for p in (run_b / "checkpoints").iterdir()] == [f"checkpoint-{stopped_at}"]
    assert not (run_b / "final_model").exists() and run_status(run_b) == "stopped"

    r = subprocess.run(_train_cmd(tiny_dataset, tmp_path / "b", "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming at step {stopped_at}" in r.stderr and str(run_b) in r.stderr
    a = load_file(next((tmp_path / "a").glob("gpt2-dutch-tiny-2*")) / "final_model" / "model.safetensors")
    b = load_file(run_b / "final_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    rows = [json.loads(x) for x in (run_b / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 25))  # every step once: none lost, none repeated after the resume


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tiny_dataset, run_copy, tmp_path):
    run_config = json.loads((run_copy / "run_config.json").read_text())
    (run_copy / "run_config.json").write_text(json.dumps({**run_config, "status": "stopped"}))
    shutil.rmtree(run_copy / "final_model")
    ckpt = run_copy / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated by a kill
    r = subprocess.run([sys.executable, "-m", "gpt2_dutch", "train", "--dataset-path", str(tiny_dataset), *TINY,
                        "--output-dir", str(run_copy.parent), "--max-steps", "4", "--resume"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipping" in r.stderr and "checkpoint-4: optimizer.pt is damaged" in r.stderr
    assert "resuming at step 2" in r.stderr and (run_copy / "final_model" / "model.safetensors").is_file()
