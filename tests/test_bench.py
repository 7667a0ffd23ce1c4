"""`gpt2-dutch bench --quick`: every part runs, and its JSON/markdown/PNG carry sane values (timings are never
asserted, only that they are positive and the ratios finite)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import assert_one_line_error

from gpt2_dutch.baselines import StepTimer


def _positive(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_quick_writes_complete_results(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quick run never reads the reference corpus: the built-in sample it is
    rc, out, err = cli("bench", "--quick", "--output-dir", "res", "--json", "b.json")
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


@pytest.mark.parametrize(("args", "message"), [
    (["nonsense"], "invalid choice: 'nonsense'"),
    (["--data-file", "missing.jsonl"], "--data-file missing.jsonl not found"),
    (["--data-file", "{txt}"], "the run_clm baseline reads JSON lines"),
])
def test_bench_bad_input(cli, tmp_path, args, message):
    txt = tmp_path / "corpus.txt"
    txt.write_text("Een zin.\n")
    rc, _, err = cli("bench", *[a.replace("{txt}", str(txt)) for a in args])
    assert_one_line_error(rc, err, message)
