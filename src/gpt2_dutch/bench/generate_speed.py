"""Generation: our decoding vs plain fp32 `model.generate`, and batch 1 against the memory-bandwidth bound."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch


def bench_generate(tokenizer_dir: str, tmp: Path, quick: bool, limits: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt2_dutch.bench.baselines import generate_recipe
    from gpt2_dutch.generate.speed import run_benchmark
    from gpt2_dutch.model.loading import load_model
    from gpt2_dutch.model.presets import gpt2_config, matmul_params

    size = "tiny" if quick else "small"
    new_tokens, repeats, batch = (16, 1, 16) if quick else (64, 3, 16)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_dir = tmp / f"generate-{size}"
    torch.manual_seed(0)  # random weights: decoding speed does not depend on their values
    model = AutoModelForCausalLM.from_config(gpt2_config(size, len(tok), 1024, tok.eos_token_id))
    n_matmul = matmul_params(model)  # all but the position table; counted before load_model packs the layers
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    del model
    model, tokenizer, _ = load_model(model_dir)
    ours = run_benchmark(model, tokenizer, new_tokens, batch, repeats=repeats)
    weight_bytes = n_matmul * model.transformer.wte.weight.element_size()
    del model
    gc.collect()
    recipe = generate_recipe(str(model_dir), ours["prompt_tokens"], ours["new_tokens"], [1, batch], repeats)
    b1, bn = ours["batch_1"]["tokens_per_s"], ours[f"batch_{batch}"]["tokens_per_s"]
    # Batch-1 decoding reads every weight once per token: bandwidth / weight bytes bounds its tokens/s.
    bound = limits["read_bytes_per_s"] / weight_bytes
    return {
        "model_size": size, "parameters": ours["parameters"], "prompt_tokens": ours["prompt_tokens"],
        "new_tokens": ours["new_tokens"], "batch": batch, "ours_dtype": ours["dtype"], "recipe_dtype": recipe["dtype"],
        "ours_batch1_tokens_per_s": b1, "recipe_batch1_tokens_per_s": recipe["batch_1"]["tokens_per_s"],
        "ours_batchN_tokens_per_s": bn, "recipe_batchN_tokens_per_s": recipe[f"batch_{batch}"]["tokens_per_s"],
        "ours_ttft_ms": ours["batch_1"]["ttft_ms"], "recipe_ttft_ms": recipe["batch_1"]["ttft_ms"],
        "ours_latency_p50_ms": ours["batch_1"]["latency_p50_ms"],
        "batch1_speedup": b1 / recipe["batch_1"]["tokens_per_s"], "batchN_over_batch1": bn / b1,
        "weight_bytes": weight_bytes, "batch1_bandwidth_bound_tokens_per_s": bound,
        "batch1_fraction_of_bandwidth_bound": b1 / bound,
    }
