"""The seed's three scripts, run verbatim: --help and end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DOCS, REPO, write_jsonl

ROOT = REPO


def _script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize(("script", "flag"), [("preprocess.py", "--dataset-size"), ("training.py", "--model-size"),
                                              ("inference.py", "--interactive")])
def test_seed_scripts_help(script, flag, tmp_path):
    r = _script(script, "--help", cwd=tmp_path)
    assert r.returncode == 0 and flag in r.stdout and f"usage: {script}" in r.stdout


@pytest.mark.slow
def test_seed_scripts_end_to_end(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS * 8)
    r = _script("preprocess.py", "--data-files", str(corpus), "--vocab-size", "300", "--chunk-size", "32",
                "--name", "chunked_10k", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _script("training.py", "--dataset-path", "processed_data/chunked_10k", "--model-size", "tiny",
                "--max-steps", "3", "--batch-size", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model = "trained_models/gpt2-dutch-tiny-latest/final_model"
    r = _script("inference.py", "--model-path", model, "--prompt", "De trein", "--max-new-tokens", "5", "--json",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["prompt"] == "De trein"
    r = _script("inference.py", "--model-path", model, "--benchmark", "--max-new-tokens", "4",
                "--benchmark-batch", "2", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    bench = json.loads(r.stdout)
    assert bench["batch_1"]["tokens_per_s"] > 0 and bench["batch_2"]["tokens_per_s"] > 0
    r = _script("training.py", "--dataset-path", "missing", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("training.py: error: dataset path missing does not exist")
