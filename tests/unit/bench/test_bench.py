"""`gpt2-dutch bench --quick`: every part runs, and its JSON/markdown/PNG carry sane values (timings are never
asserted, only that they are positive and the ratios finite)."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error

import gpt2_dutch
from gpt2_dutch.bench import BenchConfig, _use_one_device, join_json_lines
from gpt2_dutch.bench.baselines import StepTimer
from gpt2_dutch.bench.train_speed import median_tokens_per_s


def _positive(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_quick_writes_complete_results(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quick run never reads the reference corpus: the built-in sample it is
    rc, out, err = cli("bench", "--quick", "--output-dir", "res", "--json-out", "b.json")
    assert rc == 0, err
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["quick"] is True and r["text"]["file"].endswith("dutch_sample.jsonl")
    lim = r["limits"]
    assert _positive(lim["matmul_flops"]["fp32"]) and _positive(lim["matmul_flops"]["bf16"])
    assert _positive(lim["copy_bytes_per_s"]) and _positive(lim["read_bytes_per_s"])
    p = r["preprocess"]
    for key in ("ours_mb_per_s", "recipe_mb_per_s", "speedup", "ours_peak_rss_mb", "recipe_peak_rss_mb",
                "encoder_mb_per_s", "ours_fraction_of_encoder", "recipe_encoder_mb_per_s",
                "recipe_fraction_of_encoder"):
        assert _positive(p[key]), key
    assert p["encoder"] == "tiktoken"  # the sample's BPE is GPT-2-style: the fast encoder is the one measured
    assert math.isclose(p["speedup"], p["ours_mb_per_s"] / p["recipe_mb_per_s"], rel_tol=1e-9)
    # uint16 ids (plus Arrow framing) against the recipe's int64 input_ids + attention_mask + labels
    assert 2.0 <= p["ours_bytes_per_token"] < 2.5 and p["recipe_bytes_per_token"] > 3 * p["ours_bytes_per_token"]
    assert set(r["train"]) == {"sequence", "warmup_steps", "tiny"}
    t = r["train"]["tiny"]
    for key in ("ours_tokens_per_s", "recipe_tokens_per_s", "speedup", "ours_mfu", "recipe_mfu", "flops_per_token"):
        assert _positive(t[key]), key
    assert t["parameters"] > 1e5 and t["ours_precision"] in ("bf16", "fp32")
    g = r["generate"]
    for key in ("ours_batch1_tokens_per_s", "recipe_batch1_tokens_per_s", "ours_batchN_tokens_per_s",
                "recipe_batchN_tokens_per_s", "ours_ttft_ms", "recipe_ttft_ms", "batch1_speedup",
                "batchN_over_batch1", "batch1_bandwidth_bound_tokens_per_s"):
        assert _positive(g[key]), key
    assert g["model_size"] == "tiny" and g["batch"] == 16 and g["recipe_dtype"] == "float32"
    assert set(r["ratios"]) == {"preprocess_speedup", "train_tiny_speedup", "train_tiny_mfu",
                                "generate_batch1_speedup_tiny", "generate_batch16_over_batch1_tiny"}
    assert all(_positive(v["value"]) for v in r["ratios"].values())
    assert all(v["target"] is None and v["met"] is None for v in r["ratios"].values())  # not judged when quick
    md = (tmp_path / "res" / "bench.md").read_text()
    assert md.startswith("Measured by `gpt2-dutch bench --quick`") and "| benchmark | gpt2-dutch | baseline |" in md
    assert md.count("\n| ") >= 2 + 3 + 2 + 5  # header + preprocess, train and generate rows
    assert (tmp_path / "res" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "benchmark" in out and "wrote" in out


def test_step_timer_median_skips_warmup():
    timer = StepTimer()
    timer.ends = [0.0, 5.0, 6.0, 7.5, 8.5]  # a slow first step, then 1.0, 1.5, 1.0
    assert timer.median_step_s(warmup=1) == 1.0
    with pytest.raises(RuntimeError):
        timer.median_step_s(warmup=4)


def test_our_train_speed_is_the_median_step_of_metrics_jsonl_after_the_warmup():
    # what a run logged every step publishes: no tokens_per_s on the first record (nothing to measure from)
    records = [{"step": 1, "loss": 9.0}, {"step": 2, "tokens_per_s": 100.0}, {"step": 3, "tokens_per_s": 400.0},
               {"step": 4, "tokens_per_s": 200.0}, {"step": 5, "tokens_per_s": 400.0},
               {"step": 6, "eval_loss": 8.0}, {"step": 6, "train_runtime": 3.0}]
    # steps 3..5 take 1, 2 and 1 s of 400 tokens: the median step is 1 s
    assert median_tokens_per_s(records, 400, warmup=2) == 400.0
    # the median of an even count is taken over step times, as for the baseline's StepTimer: (1 + 2) / 2 s
    assert median_tokens_per_s(records[:4], 400, warmup=2) == pytest.approx(400 / 1.5)
    with pytest.raises(RuntimeError):
        median_tokens_per_s(records, 400, warmup=5)


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
])
def test_bench_bad_input(cli, tmp_path, args, message):
    txt = tmp_path / "corpus.txt"
    txt.write_text("Een zin.\n")
    rc, _, err = cli("bench", *[a.replace("{txt}", str(txt)) for a in args])
    assert_one_line_error(rc, err, message)
