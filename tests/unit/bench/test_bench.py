"""bench/__init__.py: one visible GPU, the bench apart from the product, its text from several files, bad input."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error

import gpt2_dutch
from gpt2_dutch.bench import BenchConfig, _use_one_device, join_json_lines


@pytest.mark.parametrize(("visible", "pinned"), [(None, "0"), ("2,3", "2"), ("GPU-ab12,GPU-cd34", "GPU-ab12"),
                                                 ("", ""), ("1", "1")])
def test_bench_pins_itself_to_the_first_visible_gpu(monkeypatch, visible, pinned):
    """One device, one process: CUDA_VISIBLE_DEVICES, the standard variable, keeps `train` from relaunching."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "x")  # so that the test's end restores the variable as it was
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    _use_one_device()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == pinned


def test_bench_is_apart_from_the_product():
    """Nothing in the product imports the bench, and `gpt2-dutch bench --help` does not load torch."""
    root = Path(gpt2_dutch.__file__).parent
    for path in root.rglob("*.py"):
        if "bench" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            assert not any("bench" in n.split(".") for n in names), (path, names)
    code = ("import contextlib, sys\nfrom gpt2_dutch.__main__ import run\nwith contextlib.suppress(SystemExit):\n"
            "    run('bench', ['--help'])\nprint('torch loaded' if 'torch' in sys.modules else 'light')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "gpt2-dutch bench" in r.stdout and r.stdout.splitlines()[-1] == "light"


def test_bench_takes_several_data_files_and_globs_as_one_text(tmp_path):
    import gzip

    (tmp_path / "a.jsonl").write_text('{"text": "Een."}\n\n{"text": "Twee."}')  # no final newline
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"text": "Drie."}\n')
    (tmp_path / "c.jsonl").write_text('{"text": "Vier."}\n')
    cfg = BenchConfig(data_files=[str(tmp_path / "*.jsonl*")])
    assert cfg.text_files == [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.jsonl"]
    assert BenchConfig(data_files=[str(tmp_path / "c.jsonl"), str(tmp_path / "a.jsonl")]).text_files == [
        tmp_path / "c.jsonl", tmp_path / "a.jsonl"]  # repeatable, in the order given
    joined = join_json_lines(cfg.text_files, tmp_path / "joined.jsonl")
    texts = [json.loads(line)["text"] for line in joined.read_text().splitlines()]
    assert texts == ["Een.", "Twee.", "Drie.", "Vier."]


@pytest.mark.parametrize(("args", "message"), [
    (["nonsense"], "invalid choice: 'nonsense'"),
    (["--data-files", "missing.jsonl"], "--data-files missing.jsonl not found"),
    (["--data-files", "{txt}"], "the run_clm baseline reads JSON lines"),
    (["serve", "--servers", "ours,vllm"], "--servers: vllm is not a server the bench knows; choose from ours, "),
    (["serve", "--servers", "one_at_a_time"], "--servers must include ours"),
])
def test_bench_bad_input(cli, tmp_path, args, message):
    txt = tmp_path / "corpus.txt"
    txt.write_text("Een zin.\n")
    rc, _, err = cli("bench", *[a.replace("{txt}", str(txt)) for a in args])
    assert_one_line_error(rc, err, message)
