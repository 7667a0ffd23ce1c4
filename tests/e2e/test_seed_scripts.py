"""The first-run experience: `gpt2-dutch demo --quick` end to end, and the seed's three scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DOCS, write_jsonl

from gpt2_dutch.data.sample import builtin_sample_path
from gpt2_dutch.demo import DemoConfig, demo

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_sample_is_varied_dutch_text():
    docs = [json.loads(line) for line in builtin_sample_path().read_text(encoding="utf-8").splitlines()]
    assert len(docs) >= 30 and 9500 < sum(len(d["text"].split()) for d in docs) < 11000  # "about 10,000 words"
    assert len({d["title"] for d in docs}) == len(docs)
    assert {d["register"] for d in docs} == {"encyclopedisch", "nieuws", "verhaal", "instructie", "dialoog"}
    assert all(" de " in d["text"] and " het " in d["text"].lower() for d in docs)


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    result = demo(DemoConfig(quick=True, output_dir=str(tmp_path)))
    out = capsys.readouterr().out
    run = Path(result["run"])
    assert (run / "final_model" / "model.safetensors").is_file() and (run / "loss.png").is_file()
    # 2.70 measured; a model that memorised the sample instead (the old 90 s budget) scored 5.0
    assert 0 < result["eval"]["bits_per_byte"] < 3.5 and len(result["samples"]) == 3
    assert "demo finished" in out and "bits per byte" in out and str(run / "loss.png") in out
    assert out.count(">>> ") == 3


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
