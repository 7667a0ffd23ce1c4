"""preprocess killed with SIGKILL (in a worker or the parent) and run again continues to the same output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_PART_MB, assert_one_line_error, assert_same_dataset, run

from gpt2_dutch.preprocess.parts import KILL_HOOK


def _cmd(files: list[Path], tok: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpt2_dutch", "preprocess", *[a for f in files for a in ("--data-files", str(f))],
            "--tokenizer",
            str(tok), "--output-dir", str(out), "--name", "d", "--chunk-size", "16", "--part-mb", str(TINY_PART_MB),
            *extra]


def _run_cmd(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, start_new_session=True,
                          env={**os.environ, "TQDM_DISABLE": "1", **env})


@pytest.mark.slow
@pytest.mark.parametrize("what", ["worker", "run"])
def test_a_run_killed_with_sigkill_continues_to_the_same_output(tmp_path, mixed_files, small_tokenizer, what):
    reference = run(tmp_path / "ref", mixed_files, small_tokenizer)
    out = tmp_path / "out"
    cmd = _cmd(mixed_files, small_tokenizer, out, "--num-workers", "2")
    killed = _run_cmd(cmd, **{KILL_HOOK: "f00000-b000009" + (":run" if what == "run" else "")})
    if what == "worker":  # the run sees its worker die: one line, exit 1
        assert_one_line_error(killed.returncode, killed.stderr, "a preprocess worker died", code=1)
    else:  # the whole run is gone at once, as with kill -9 of the job
        assert killed.returncode == -signal.SIGKILL
    work = out / ".d.work"
    assert not (out / "d").exists(), "nothing that looks finished"
    parts = sorted((work / "parts" / "train").glob("*.npz"))
    assert parts and "f00000-b000009.npz" not in [p.name for p in parts]
    for p in parts:  # every part file there is whole
        with np.load(p) as z:
            assert len(z["tokens"]) == int(z["doc_tokens"].sum())
    before = {p.name: p.stat().st_mtime_ns for p in parts}
    again = _run_cmd(cmd)
    assert again.returncode == 0, again.stderr
    assert_same_dataset(reference, out / "d")
    assert not work.exists()
    # the parts done before the kill were not encoded again
    assert json.loads((out / "d" / "manifest.json").read_text())["parts"]["train"] > len(before)
