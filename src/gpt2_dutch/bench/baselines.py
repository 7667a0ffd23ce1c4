"""The standard recipes that `gpt2-dutch bench` measures us against: not product code, only the bench imports it.

Each is what a user would write without this project, kept as close to its source as the benchmark allows:
- preprocess: transformers' examples/pytorch/language-modeling/run_clm.py — `load_dataset` -> `map(tokenize)`
  -> `map(group_texts)` -> `save_to_disk`, one process, the same tokenizer and block size as ours;
- train: a run_clm-style `Trainer` on the same chunks: GPT-2's default config (dropout 0.1), fp32, eager
  (no compile), `default_data_collator` with labels = input_ids, the Trainer's default optimiser;
- generate: plain `AutoModelForCausalLM.from_pretrained(...)` in fp32 and `model.generate`.
"""

from __future__ import annotations

import json
import statistics
import time
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


def preprocess_recipe(data_file: str, tokenizer_dir: str, output_dir: str, cache_dir: str, block_size: int) -> dict:
    """run_clm.py's data path; returns the tokens it stored (timing and memory are measured by the caller)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw = load_dataset("json", data_files=data_file, cache_dir=cache_dir)
    columns = raw["train"].column_names
    tokenized = raw.map(lambda examples: tokenizer(examples["text"]), batched=True, remove_columns=columns)

    def group_texts(examples: dict[str, list]) -> dict[str, list]:
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = len(concatenated[list(examples.keys())[0]]) // block_size * block_size
        result = {k: [t[i:i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = tokenized.map(group_texts, batched=True)
    grouped.save_to_disk(output_dir)
    return {"tokens": sum(len(grouped[s]) for s in grouped) * block_size}


class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step, data loading included."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.ends = [time.perf_counter()]

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())

    def median_step_s(self, warmup: int) -> float:
        durations = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][warmup:]
        if not durations:
            raise RuntimeError("no timed steps: raise the step count above the warm-up")
        return statistics.median(durations)


def train_recipe(dataset_dir: str, model_size: str, batch_size: int, steps: int, output_dir: str,
                 timer: StepTimer) -> None:
    """A run_clm-style Trainer run from scratch in fp32 eager; the timer gets the per-step times."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, GPT2Config, Trainer, TrainingArguments, default_data_collator

    from ..model import MODEL_PRESETS

    data = load_from_disk(dataset_dir)["train"]
    context = len(data[0]["input_ids"])
    manifest = json.loads((Path(dataset_dir) / "manifest.json").read_text())
    eos, p = manifest["tokenizer"]["eos_token_id"], MODEL_PRESETS[model_size]
    config = GPT2Config(vocab_size=manifest["vocab_size"], n_positions=context, n_layer=p.n_layer, n_embd=p.n_embd,
                        n_head=p.n_head, bos_token_id=eos, eos_token_id=eos)
    model = AutoModelForCausalLM.from_config(config)
    data = data.with_transform(lambda batch: {"input_ids": batch["input_ids"], "labels": batch["input_ids"]})
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=5e-5, save_strategy="no", logging_strategy="no", report_to=[],
                             use_cpu=not torch.cuda.is_available(), seed=42, disable_tqdm=True,
                             remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
            callbacks=[timer]).train()


@torch.inference_mode()
def generate_recipe(model_dir: str, prompt_tokens: int, new_tokens: int, batches: list[int], repeats: int) -> dict:
    """Plain fp32 `model.generate` (greedy, KV cache): tokens/s per batch size and time to first token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    out: dict[str, Any] = {"dtype": str(model.dtype).replace("torch.", "")}

    def timed(ids: torch.Tensor, n: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt_tokens), device=device)
        timed(ids, min(new_tokens, 8))  # warm-up, not counted
        seconds = statistics.median(timed(ids, new_tokens) for _ in range(repeats))
        entry = {"tokens_per_s": batch * new_tokens / seconds, "seconds": seconds}
        if batch == 1:
            entry["ttft_ms"] = 1000 * statistics.median(timed(ids, 1) for _ in range(repeats))
        out[f"batch_{batch}"] = entry
    return out
