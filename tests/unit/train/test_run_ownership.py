"""train/run.py's one writer per run directory: a live run is never trained by a second process, and what a
killed one left half written is removed by the next owner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.core.ownership import DirectoryOwner
from gpt2_dutch.train import TrainConfig, train
from gpt2_dutch.train.run import RUN_LOCK


def _cfg(dataset: Path, out: Path, **kw) -> TrainConfig:
    base = dict(dataset_path=str(dataset), model_size="pico", batch_size=2, precision="fp32", output_dir=str(out),
                max_steps=2, save_every=2, quiet=True)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def finished_run(tiny_dataset: Path, tmp_path: Path) -> Path:
    return train(_cfg(tiny_dataset, tmp_path))


@pytest.mark.slow
def test_a_run_being_trained_is_not_resumed_by_a_second_process(finished_run, tiny_dataset, tmp_path):
    before = {name: (finished_run / name).read_bytes() for name in ("run_config.json", "metrics.jsonl")}
    assert not (finished_run / RUN_LOCK).exists()  # released when the run ended
    holder = DirectoryOwner(finished_run, "training run", lock_path=finished_run / RUN_LOCK).acquire()
    try:
        with pytest.raises(UsageError) as refused:
            train(_cfg(tiny_dataset, tmp_path, resume=str(finished_run), max_steps=4))
    finally:
        holder.release()
    message = str(refused.value)
    assert f"another training run is writing {finished_run} now (pid {os.getpid()})" in message
    assert "\n" not in message
    assert {name: (finished_run / name).read_bytes() for name in before} == before  # nothing changed
    assert json.loads(before["run_config.json"])["status"] == "finished"


@pytest.mark.slow
def test_the_next_owner_removes_the_staging_of_a_dead_run_only(finished_run, tiny_dataset, tmp_path):
    dead = finished_run / ".final_model.tmp-999999999"  # no such PID
    alive = finished_run / f".final_model.tmp-{os.getppid()}"  # a live process's: not ours to touch
    for staging in (dead, alive):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"half")
    train(_cfg(tiny_dataset, tmp_path, resume=str(finished_run), max_steps=3))
    assert not dead.exists() and alive.is_dir()
    assert json.loads((finished_run / "run_config.json").read_text())["total_steps"] == 3
    assert not (finished_run / RUN_LOCK).exists()
