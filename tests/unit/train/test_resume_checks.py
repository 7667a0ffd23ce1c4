"""What train checks before it touches a run: a damaged tokenizer and checkpoint files holding objects that are
never unpickled are one line each, and the run's record is left as it was."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.runs.records import usable_checkpoint
from gpt2_dutch.train import TrainConfig, train


def _cfg(dataset: Path, out: Path, **kw) -> TrainConfig:
    base = dict(dataset_path=str(dataset), model_size="pico", batch_size=2, precision="fp32", output_dir=str(out),
                max_steps=2, save_every=2, quiet=True)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def stopped_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step run: its checkpoint is what the rows below tamper with (each on its own copy)."""
    return train(_cfg(tiny_dataset, tmp_path_factory.mktemp("runs")))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_a_checkpoint_file_holding_other_objects_is_refused_before_the_record_changes(
        stopped_run, tiny_dataset, tmp_path, name):
    run = Path(shutil.copytree(stopped_run, tmp_path / stopped_run.name, symlinks=True))
    checkpoint = usable_checkpoint(run)
    torch.save({"state": argparse.Namespace(lr=1.0)}, checkpoint / name)  # a zip archive, but not only tensors
    record = (run / "run_config.json").read_bytes()
    with pytest.raises(UsageError) as refused:
        train(_cfg(tiny_dataset, tmp_path, resume=str(checkpoint), max_steps=4))
    message = str(refused.value)
    assert message.startswith(f"cannot resume from {checkpoint}: {name} holds objects that are never unpickled")
    assert "\n" not in message and "earlier checkpoint" in message
    assert (run / "run_config.json").read_bytes() == record


@pytest.mark.parametrize("damage", [b"{not json", b"", b'{"model": {"type": "Nonsense"}}'])
def test_a_damaged_tokenizer_in_the_dataset_is_one_line(tiny_dataset, tmp_path, damage):
    dataset = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    (dataset / "tokenizer.json").write_bytes(damage)
    with pytest.raises(UsageError) as refused:
        train(_cfg(dataset, tmp_path / "runs"))
    message = str(refused.value)
    assert message.startswith(f"{dataset}: its tokenizer cannot be loaded (") and "preprocess the data again" in message
    assert "\n" not in message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run was started
