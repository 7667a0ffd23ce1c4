"""Generate Dutch text with a trained model: prompts, a batch, an interactive REPL, or a speed benchmark.

    gpt2-dutch generate --model-path trained_models/gpt2-dutch-small-latest --prompt "Er was eens"
    gpt2-dutch generate --model-path M --prompt-file prompts.txt --greedy --json
    gpt2-dutch generate --model-path M --interactive          # /temp 0.7, /topk 40, /max 200, /help, /quit
    gpt2-dutch generate --model-path M --benchmark            # tokens/s at batch 1 and 16, latency

Uses transformers `generate` (KV cache, logits processors). One prompt streams to the terminal as it is
produced; several prompts run as one left-padded batch. Each prompt gets its own budget of new tokens,
min(--max-new-tokens, context - its length); a prompt longer than the context keeps its end. Both are said on
stderr, one line per prompt. Weights load from safetensors only; remote code never runs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2_dutch.core.errors import UsageError, check, check_number, check_seed
from gpt2_dutch.core.options import option

DEFAULT_PROMPTS = ["Amsterdam is een stad", "Het weer in Nederland", "Er was eens een"]
# Each sample is a row of the batch (and of the KV cache): these bounds keep a typo from asking for billions.
MAX_RETURN_SEQUENCES = 1000
MAX_BENCHMARK_BATCH = 4096


@dataclass
class GenerateConfig:
    model_path: str = option("trained_models/gpt2-dutch-small-latest/final_model",
                             "a final_model directory, a run directory, or a *-latest link")
    prompt: list[str] = option([], "a prompt (repeatable); default: three Dutch prompts")
    prompt_file: str | None = option(None, "a file with one prompt per line")
    interactive: bool = option(False, "a REPL: type prompts, change settings with /commands")
    benchmark: bool = option(False, "measure tokens/s (batch 1 and --benchmark-batch), time to first token, latency")
    benchmark_batch: int = option(16, "the larger batch size of --benchmark")
    max_new_tokens: int = option(100, "tokens to generate per prompt (at most the context minus the prompt's "
                                      "length; a capped prompt is named on stderr)")
    temperature: float = option(0.8, "sampling temperature")
    top_k: int = option(50, "sample from the k most likely tokens (0: off)")
    top_p: float = option(0.95, "nucleus sampling: smallest set with this probability mass (1: off)")
    repetition_penalty: float = option(1.0, "> 1 discourages repeating tokens")
    num_return_sequences: int = option(1, "samples per prompt")
    greedy: bool = option(False, "always take the most likely token (deterministic)")
    seed: int | None = option(None, "seed for reproducible sampling")
    device: str = option("auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)")
    precision: str = option("auto", "weights dtype (auto: bf16 on GPUs and CPUs with fast bf16, else fp32)",
                            choices=["auto", "bf16", "fp16", "fp32"], aliases=["--dtype"])
    json: bool = option(False, "print results as JSON")

    def __post_init__(self) -> None:
        # A huge --max-new-tokens or --top-k needs no upper bound: each is capped by the context or the vocabulary.
        check(self.max_new_tokens > 0, f"--max-new-tokens must be positive (got {self.max_new_tokens})")
        check_number(self.temperature, "--temperature")  # argparse takes inf and nan for floats
        check(self.temperature > 0, f"--temperature must be positive (got {self.temperature}); use --greedy")
        check(self.top_k >= 0, f"--top-k must be >= 0 (got {self.top_k})")
        check_number(self.top_p, "--top-p")
        check(0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p})")
        check_number(self.repetition_penalty, "--repetition-penalty")
        check(self.repetition_penalty > 0, f"--repetition-penalty must be positive (got {self.repetition_penalty})")
        check(0 < self.num_return_sequences <= MAX_RETURN_SEQUENCES, "--num-return-sequences must be between 1 "
              f"and {MAX_RETURN_SEQUENCES} (got {self.num_return_sequences})")
        check(0 < self.benchmark_batch <= MAX_BENCHMARK_BATCH, f"--benchmark-batch must be between 1 and "
              f"{MAX_BENCHMARK_BATCH} (got {self.benchmark_batch})")
        check_seed(self.seed)


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        check(not path.is_dir(), f"prompt file {path} is a directory; give a text file with one prompt per line")
        check(path.is_file(), f"prompt file {path} not found")
        try:
            lines = path.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            line = path.read_bytes()[:e.start].count(b"\n") + 1
            raise UsageError(f"prompt file {path} is not UTF-8 text (line {line}: byte 0x{e.object[e.start]:02x}); "
                             "convert it with e.g. `iconv -t utf-8`") from None
        except OSError as e:
            raise UsageError(f"prompt file {path} cannot be read ({e.strerror})") from None
        from_file = [line for line in lines if line.strip()]
        check(bool(from_file), f"prompt file {path} holds no prompts (blank lines are skipped)")
        prompts += from_file
    return prompts or list(DEFAULT_PROMPTS)


def generate(cfg: GenerateConfig) -> Any:
    from gpt2_dutch.generate.sampling import generate_texts, plan_prompts, print_notices
    from gpt2_dutch.model.loading import context_length, load_model

    model, tokenizer, model_dir = load_model(cfg.model_path, cfg.device, cfg.precision)
    if cfg.benchmark:
        from gpt2_dutch.generate.speed import print_benchmark, run_benchmark

        result = run_benchmark(model, tokenizer, cfg.max_new_tokens, cfg.benchmark_batch)
        print(json.dumps(result, indent=2) if cfg.json else print_benchmark(result))
        return result
    if cfg.interactive:
        from gpt2_dutch.generate.repl import repl

        return repl(model, tokenizer, cfg, sys.stdin, sys.stdout)
    prompts = read_prompts(cfg)
    context = context_length(model)
    plans = plan_prompts(tokenizer, prompts, context, cfg.max_new_tokens)
    print_notices(plans, context, single=len(prompts) == 1)
    if cfg.json:
        results = generate_texts(model, tokenizer, prompts, cfg, plans=plans)
        print(json.dumps([{"prompt": p, "completions": c, **plan.as_json()}
                          for p, c, plan in zip(prompts, results, plans, strict=True)], ensure_ascii=False, indent=2))
        return results
    from transformers import TextStreamer

    results = []
    for prompt, plan in zip(prompts, plans, strict=True) if cfg.num_return_sequences == 1 and len(prompts) <= 3 \
            else []:
        print(f"\n>>> {prompt}", end="", flush=True)  # stream each prompt's text as it is produced
        results += generate_texts(model, tokenizer, [prompt], cfg, TextStreamer(tokenizer, skip_prompt=True,
                                                                                  skip_special_tokens=True),
                                  plans=[plan])
    if not results:  # many prompts: one batch is much faster than streaming them one by one
        results = generate_texts(model, tokenizer, prompts, cfg, plans=plans)
        for prompt, completions in zip(prompts, results, strict=True):
            for c in completions:
                print(f"\n>>> {prompt}{c}")
    return results
