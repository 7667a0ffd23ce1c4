"""`gpt2-dutch bench --quick`, `bench quality --quick` and `bench serve --quick` end to end: every part runs and its
JSON/markdown/PNG carry sane values (timings are never asserted, only that they are positive and the ratios finite)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gpt2_dutch.data.sample import builtin_sample_path


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


def _positive(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_quality_quick_writes_both_figures_and_their_ratio(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ablation = tmp_path / "higher-lr.yaml"
    ablation.write_text("learning_rate: 3e-3\n")
    rc, out, err = cli("bench", "quality", "--quick", "--max-time", "3s", "--ours-config", ablation,
                       "--ablation", "defaults", "--output-dir", "res")
    assert rc == 0, err
    r = json.loads((tmp_path / "res" / "bench.json").read_text())
    q = r["quality"]
    assert q["budget_s"] == 3.0 and q["seeds"] == [42] and len(q["runs"]) == 1
    run = q["runs"][0]
    for side in ("ours", "baseline"):
        for key in ("bits_per_byte", "loss", "train_seconds", "steps", "tokens", "parameters", "tokens_scored"):
            assert _positive(run[side][key]), (side, key)
    # both scored the same documents with the same tokenizer: the same number of tokens
    assert run["ours"]["tokens_scored"] == run["baseline"]["tokens_scored"]
    assert run["ratio"] == pytest.approx(run["ours"]["bits_per_byte"] / run["baseline"]["bits_per_byte"], rel=1e-12)
    assert q["ratio"] == pytest.approx(q["ours_bits_per_byte"] / q["baseline_bits_per_byte"], rel=1e-12)
    assert q["ours_bits_per_byte"] == run["ours"]["bits_per_byte"]
    # the ablation is named and applied; the baseline is the textbook shape
    assert q["ours"]["name"] == "higher-lr" and q["ours"]["overrides"] == {"learning_rate": 3e-3}
    # ours is --model-size auto: 3 seconds are far below ~20 tokens per parameter for any preset, so the smallest
    assert q["ours"]["settings"]["learning_rate"] == 3e-3 and q["ours"]["settings"]["model_size"] == "pico"
    assert q["baseline"]["settings"]["n_embd"] == 256 and q["baseline"]["settings"]["precision"] == "fp32"
    # held out by text: no held-out document is among the documents either side trained on
    docs = [json.loads(line)["text"] for line in builtin_sample_path().read_text().splitlines() if line.strip()]
    held = {docs[i] for i in q["heldout"]["indices"]}
    train = {d for i, d in enumerate(docs) if i not in set(q["heldout"]["indices"])}
    assert len(held) == q["heldout"]["documents"] >= 3 and not held & train
    assert q["train_text"]["documents"] + q["train_text"]["ours_test_split_documents"] == len(docs) - len(held)
    assert r["ratios"]["quality_bpb_ratio"]["value"] == q["ratio"] and r["ratios"]["quality_bpb_ratio"]["met"] is None
    md = (tmp_path / "res" / "bench.md").read_text()
    assert "quality (higher-lr): held-out bits per byte after 3 s, seed 42" in md and "learning_rate: 0.003" in md
    # the ablation variant: our defaults beside it, same seed, scored against the same baseline run
    (v,) = q["ablation"]
    assert v["name"] == "defaults" and v["overrides"] == {}
    # not the ablation's 3e-3 nor the size table's 2e-3: the rate chosen for the budget (test_budget.py checks it)
    assert v["settings"]["learning_rate"] not in (3e-3, 2e-3) and v["settings"]["model_size"] == "pico"
    assert v["ratio"] == pytest.approx(v["mean_bits_per_byte"] / q["baseline_bits_per_byte"], rel=1e-12)
    assert _positive(v["mean_bits_per_byte"]) and v["bits_per_byte"] == [v["mean_bits_per_byte"]]
    assert "quality ablation 'defaults': held-out bits per byte, seed 42" in md and "- ablation 'defaults'" in md
    assert "quality (higher-lr)" in out and (tmp_path / "res" / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_quality_shape_quick_writes_both_curves_the_ratio_and_the_plot(cli, tmp_path, monkeypatch):
    """--shape nano --tokens N --quick: ours and the swept AdamW peer at one shape and token count, both scored at
    the same steps on the same held-out documents; the ratio is the curves' own arithmetic (test_curves.py). One
    seed: a second adds ~7 s (the mean over seeds is test_curves.py's)."""
    from gpt2_dutch.bench.curves import tokens_to_reach

    monkeypatch.chdir(tmp_path)
    rc, out, err = cli("bench", "quality", "--quick", "--shape", "nano", "--tokens", "2048", "--seeds", "1",
                       "--output-dir", "res")
    assert rc == 0, err
    se = json.loads((tmp_path / "res" / "bench.json").read_text())["sample_efficiency"]
    assert se["shape"] == "nano" and se["seeds"] == [42] and se["tokens"] >= 2048
    tokens_per_step = se["ours"]["settings"]["tokens_per_step"]
    assert se["tokens"] == se["steps"] * tokens_per_step and se["points"][-1] == se["steps"] and len(se["points"]) == 4
    assert se["ours"]["settings"]["model_size"] == "nano" and se["ours"]["settings"]["optimizer"] == "muon"
    sweep = se["peer"]["lr_sweep"]
    assert sweep["seed"] == 42 and sweep["learning_rates"] == [1e-3, 2e-3, 4e-3]
    assert sweep["chosen"] == se["peer"]["learning_rate"] == sweep["learning_rates"][
        sweep["final_bits_per_byte"].index(min(sweep["final_bits_per_byte"]))]
    assert se["peer"]["settings"]["tokens_per_step"] == tokens_per_step and se["peer"]["settings"]["dropout"] == 0.0
    for run in se["runs"]:
        o, p = run["ours"], run["peer"]
        assert o["tokens"] == p["tokens"] == se["tokens"] and p["learning_rate"] == sweep["chosen"]
        # the same steps, the same held-out tokens scored: one curve against the other, point by point
        assert [c["step"] for c in o["curve"]] == [c["step"] for c in p["curve"]] == se["points"]
        assert [c["tokens"] for c in o["curve"]] == [s * tokens_per_step for s in se["points"]]
        assert len({c["tokens_scored"] for c in o["curve"] + p["curve"]}) == 1
        assert all(_positive(c["bits_per_byte"]) for c in o["curve"] + p["curve"])
        assert o["final_bits_per_byte"] == o["curve"][-1]["bits_per_byte"]
        assert p["parameters"] < o["parameters"]  # the peer's head is tied, GPT-2's own
        r = run["reach"]
        assert r["target_bits_per_byte"] == p["final_bits_per_byte"]
        expected, _ = tokens_to_reach([(c["tokens"], c["bits_per_byte"]) for c in o["curve"]], p["final_bits_per_byte"])
        assert r["tokens"] == expected and r["ratio"] == (None if expected is None else expected / se["tokens"])
    assert sweep["final_bits_per_byte"][sweep["learning_rates"].index(sweep["chosen"])] == \
        se["runs"][0]["peer"]["final_bits_per_byte"]
    md = (tmp_path / "res" / "bench.md").read_text()
    assert "Sample efficiency at `nano`" in md and "nano, seed 42: tokens until ours reaches the peer's final" in md
    assert se["plot"].endswith("bench_curves.png") and "Plot: bench_curves.png" in md and "Sample efficiency" in out
    assert (tmp_path / "res" / "bench_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_serve_quick_measures_every_server(cli, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # transformers serve --continuous-batching is left out: its start-up alone takes ~40 s here, and it is measured
    # by the same code as transformers_serve with one more flag
    rc, _, err = cli("bench", "serve", "--quick", "--servers", "ours,one_at_a_time,transformers_serve",
                     "--json-out", "b.json", "--markdown-out", "b.md", "--plot-out", "b.png")
    assert rc == 0, err
    s = json.loads((tmp_path / "b.json").read_text())["serve"]
    assert s["model_size"] == "tiny" and s["clients"] == [1, 4, 16]
    assert set(s["servers"]) == {"ours", "one_at_a_time", "transformers_serve"}
    for name, runs in s["servers"].items():
        if "error" in runs:  # a baseline that cannot run here says why; ours always runs
            assert name != "ours" and runs["error"]
            continue
        for clients, r in runs.items():
            assert r["clients"] == int(clients) and r["tokens"] > 0 and r["tokens_per_s"] > 0
            assert 0 < r["ttft_p50_ms"] <= r["ttft_p95_ms"] and 0 < r["latency_p50_s"] <= r["latency_p95_s"]
    ours = s["servers"]["ours"]
    assert all(r["tokens"] == r["requests"] * s["max_tokens"] for r in ours.values())  # ignore_eos: all of them
    assert math.isclose(s["ours_16_over_1"], ours["16"]["tokens_per_s"] / ours["1"]["tokens_per_s"])
