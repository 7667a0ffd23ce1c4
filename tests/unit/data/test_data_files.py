"""data/sources.expand_data_files: only regular files are read, so a FIFO or a device never hangs a command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.data.sources import expand_data_files


def _fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "texts.jsonl")
    return str(tmp / "texts.jsonl")


def _device_link(tmp: Path) -> str:
    (tmp / "zero.jsonl").symlink_to("/dev/zero")
    return str(tmp / "zero.jsonl")


@pytest.mark.parametrize(("make", "kind"), [
    (_fifo, "a FIFO"),
    (lambda tmp: "/dev/zero", "a device"),
    (_device_link, "a device"),  # the link is followed: what would be read is the device
])
def test_a_data_file_that_is_not_a_regular_file_is_one_line(tmp_path, make, kind):
    path = make(tmp_path)
    with pytest.raises(UsageError) as refused:
        expand_data_files([path])
    assert str(refused.value) == (f"data file {path} is {kind}, not a regular file; give regular files (.jsonl, "
                                  ".json, .parquet or .txt)")


def test_the_cli_refuses_a_fifo_at_once(tmp_path, cli):
    rc, _out, err = cli("preprocess", "--data-files", _fifo(tmp_path), "--output-dir", str(tmp_path / "out"))
    assert rc == 2 and err.strip().endswith("is a FIFO, not a regular file; give regular files (.jsonl, .json, "
                                            ".parquet or .txt)")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
