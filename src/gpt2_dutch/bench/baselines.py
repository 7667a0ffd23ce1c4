"""The standard recipes that `gpt2-dutch bench` measures us against: not product code, only the bench imports it.

Each is what a user would write without this project, kept as close to its source as the benchmark allows:
- preprocess: transformers' examples/pytorch/language-modeling/run_clm.py — `load_dataset` -> `map(tokenize)`
  -> `map(group_texts)` -> `save_to_disk`, one process, the same tokenizer and block size as ours;
- train: a run_clm-style `Trainer` on the same chunks: GPT-2's default config (dropout 0.1), fp32, eager
  (no compile), `default_data_collator` with labels = input_ids, the Trainer's default optimiser;
- generate: plain `AutoModelForCausalLM.from_pretrained(...)` in fp32 and `model.generate`;
- quality: a textbook from-scratch GPT-2 run with the Trainer (TEXTBOOK below): run_clm's data path with an
  <|endoftext|> after each document, `GPT2Config` defaults but for the shape, AdamW, warmup then cosine to 0
  (`lr_scheduler_type="cosine"`, i.e. transformers' get_cosine_schedule_with_warmup), fp32, `max_steps` set from
  a short timing run so that the steps fill the time budget;
- sample efficiency: a tuned AdamW peer (ADAMW_PEER below) at our shape, on our chunks, with our tokens per step:
  plain `GPT2LMHeadModel`, AdamW (0.9, 0.95), weight decay 0.1, warmup then cosine, no dropout, bf16 autocast;
  its learning rate is swept by the bench.
"""

from __future__ import annotations

import math
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

    from gpt2_dutch.data.chunks import read_manifest
    from gpt2_dutch.model.presets import MODEL_PRESETS

    data = load_from_disk(dataset_dir)["train"]
    context = len(data[0]["input_ids"])
    manifest = read_manifest(dataset_dir)
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


# The textbook recipe that `gpt2-dutch bench quality` trains next to ours. Written out plainly; nothing of ours.
TEXTBOOK = {"n_layer": 4, "n_embd": 256, "n_head": 4, "context": 256, "batch_size": 8, "learning_rate": 1e-3,
            "adam_beta1": 0.9, "adam_beta2": 0.95, "weight_decay": 0.1, "warmup": 0.05,
            "schedule": "linear warmup, then cosine to 0 (get_cosine_schedule_with_warmup)", "precision": "fp32",
            "dropout": 0.1, "max_grad_norm": 1.0}  # the last two: GPT2Config's and the Trainer's defaults


def textbook_dataset(train_file: str, tokenizer_dir: str, cache_dir: str) -> Any:
    """run_clm.py's data path on the training documents: tokenize, concatenate, cut into context-sized blocks.

    One change from run_clm: an <|endoftext|> after each document, as GPT-2 was trained (and nanoGPT's
    prepare.py does). The held-out documents are scored after an <|endoftext|>; a model that never saw that
    token would lose there for a reason that has nothing to do with its recipe."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    block = TEXTBOOK["context"]
    raw = load_dataset("json", data_files=train_file, cache_dir=cache_dir)["train"]

    def tokenize(examples: dict[str, list]) -> dict[str, list]:
        out = tokenizer(examples["text"])
        return {k: [v + [tokenizer.eos_token_id if k == "input_ids" else 1] for v in vs] for k, vs in out.items()}

    def group_texts(examples: dict[str, list]) -> dict[str, list]:
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = len(concatenated["input_ids"]) // block * block
        result = {k: [t[i:i + block] for i in range(0, total, block)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    return tokenized.map(group_texts, batched=True)


class TimeFirstSteps(TrainerCallback):
    """What a user does before setting max_steps: run some steps and time them. The first step (allocation,
    CUDA start-up) is not counted; it stops once TIMED_SHARE of the budget and at least 3 steps are timed. Why a
    tenth and not the 3 steps or 5% by which our --max-time first fits: ours refits its length while its rate is
    at the peak, and the textbook's cosine is fixed from its first step, so this one measurement is all it gets
    (3 steps misread the speed on a shared machine by up to 27%: 176 s of training for a 240 s budget)."""

    TIMED_SHARE = 0.1
    MIN_TIMED_STEPS = 3

    def __init__(self, budget_s: float) -> None:
        self.budget_s, self.after_first, self.seconds_per_step = budget_s, 0.0, 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        if state.global_step == 1:
            self.after_first = now
            return
        measured = state.global_step - 1
        if measured < self.MIN_TIMED_STEPS or now - self.after_first < self.TIMED_SHARE * self.budget_s:
            return
        self.seconds_per_step = (now - self.after_first) / measured
        control.should_training_stop = True


def _textbook_trainer(data: Any, tokenizer_dir: str, output_dir: str, steps: int, seed: int,
                      callbacks: list[TrainerCallback]) -> Any:
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    t = TEXTBOOK
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    set_seed(seed)  # the weights: GPT2Config's init, drawn before the Trainer seeds the data order
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=t["context"], n_embd=t["n_embd"],
                        n_layer=t["n_layer"], n_head=t["n_head"], resid_pdrop=t["dropout"], embd_pdrop=t["dropout"],
                        attn_pdrop=t["dropout"], bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(config)
    # No evaluation and no checkpoints during training: the budget is for training steps (our --max-time counts
    # only the steps too), and the held-out documents are scored afterwards, the same way for both sides.
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=t["batch_size"], max_steps=steps,
                             learning_rate=t["learning_rate"], adam_beta1=t["adam_beta1"], adam_beta2=t["adam_beta2"],
                             weight_decay=t["weight_decay"], max_grad_norm=t["max_grad_norm"],
                             lr_scheduler_type="cosine", warmup_steps=t["warmup"], seed=seed, eval_strategy="no",
                             save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available())
    return Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                   callbacks=callbacks)


def quality_recipe(data: Any, tokenizer_dir: str, output_dir: str, budget_s: float, seed: int) -> dict[str, Any]:
    """Train the textbook recipe for `budget_s` seconds of steps; save the model in output_dir/final_model.

    The Trainer has no time limit, so do what a user does: time a few steps (a short run that is thrown away),
    then set max_steps so that the cosine ends when the budget does. A separate run rather than a callback that
    changes max_steps mid-run: the real run is then an unmodified Trainer with a schedule fixed from the start."""
    from transformers import AutoTokenizer

    timing = TimeFirstSteps(budget_s)
    _textbook_trainer(data, tokenizer_dir, f"{output_dir}/timing", 10**9, seed, [timing]).train()
    steps = max(1, int(budget_s / timing.seconds_per_step))
    timer = StepTimer()
    trainer = _textbook_trainer(data, tokenizer_dir, output_dir, steps, seed, [timer])
    result = trainer.train()
    final = Path(output_dir) / "final_model"
    trainer.save_model(str(final))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(final))
    # The Trainer keeps the last, smaller batch of each epoch (dataloader_drop_last=False): count what it saw.
    n, batch = len(data), TEXTBOOK["batch_size"]
    per_epoch = math.ceil(n / batch)
    chunks = steps // per_epoch * n + min(steps % per_epoch * batch, n)
    return {"steps": trainer.state.global_step, "train_seconds": timer.ends[-1] - timer.ends[0],
            "seconds_per_step_measured": timing.seconds_per_step, "tokens": chunks * TEXTBOOK["context"],
            "parameters": sum(p.numel() for p in trainer.model.parameters()), "train_loss": result.training_loss,
            "model": str(final)}


# The tuned AdamW peer of `bench quality --shape`: what a careful user writes with the Trainer, and nothing of ours
# (no Muon, no warmup-stable-decay, no untied head, no chunked loss). The learning rate is the bench's sweep's.
ADAMW_PEER = {"optimizer": "AdamW (the Trainer's default, adamw_torch_fused)", "adam_beta1": 0.9,
              "adam_beta2": 0.95, "weight_decay": 0.1, "warmup": 0.05,
              "schedule": "linear warmup, then cosine to 0 (get_cosine_schedule_with_warmup)",
              "precision": "bf16 autocast (TrainingArguments bf16=True)", "dropout": 0.0, "max_grad_norm": 1.0,
              "tie_embeddings": True}  # GPT-2's own tied head, GPT2Config's default


class SaveAtSteps(TrainerCallback):
    """Save the model (and tokenizer) at the end of the given optimizer steps, as out/step-N: the points of the
    evaluation curve, scored afterwards with `gpt2-dutch evaluate` like our checkpoints."""

    def __init__(self, steps: list[int], out: Path, tokenizer: Any) -> None:
        self.steps, self.out, self.tokenizer = set(steps), out, tokenizer
        self.saved: dict[int, str] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step in self.steps and state.global_step not in self.saved:
            path = self.out / f"step-{state.global_step}"
            model.save_pretrained(str(path))
            self.tokenizer.save_pretrained(str(path))
            self.saved[state.global_step] = str(path)


def peer_recipe(dataset_dir: str, shape: dict[str, int], batch_size: int, accumulation: int, steps: int,
                learning_rate: float, seed: int, output_dir: str, snapshot_steps: list[int]) -> dict[str, Any]:
    """Train the ADAMW_PEER recipe on the train split of our processed dataset (the same chunks ours trains on) for
    `steps` optimizer steps of batch_size x accumulation chunks; {step: model directory} of its snapshots."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

    from gpt2_dutch.data.chunks import read_manifest

    p = ADAMW_PEER
    data = load_from_disk(dataset_dir)["train"]
    context, manifest = len(data[0]["input_ids"]), read_manifest(dataset_dir)
    tokenizer = AutoTokenizer.from_pretrained(dataset_dir)
    eos = manifest["tokenizer"]["eos_token_id"]
    set_seed(seed)  # the weights: GPT2Config's init, drawn before the Trainer seeds the data order
    config = GPT2Config(vocab_size=manifest["vocab_size"], n_positions=context, n_layer=shape["n_layer"],
                        n_embd=shape["n_embd"], n_head=shape["n_head"], resid_pdrop=p["dropout"],
                        embd_pdrop=p["dropout"], attn_pdrop=p["dropout"], bos_token_id=eos, eos_token_id=eos,
                        tie_word_embeddings=p["tie_embeddings"])
    model = GPT2LMHeadModel(config)
    data = data.with_transform(lambda batch: {"input_ids": torch.tensor(batch["input_ids"], dtype=torch.long),
                                              "labels": torch.tensor(batch["input_ids"], dtype=torch.long)})
    # whole batches only (as ours): every step is batch_size x accumulation chunks, so both see the same tokens
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=learning_rate,
                             adam_beta1=p["adam_beta1"], adam_beta2=p["adam_beta2"], weight_decay=p["weight_decay"],
                             max_grad_norm=p["max_grad_norm"], lr_scheduler_type="cosine", warmup_steps=p["warmup"],
                             bf16=True, seed=seed, dataloader_drop_last=True, eval_strategy="no",
                             save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
                             remove_unused_columns=False, use_cpu=not torch.cuda.is_available())
    saver = SaveAtSteps(snapshot_steps, Path(output_dir), tokenizer)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[saver])
    result = trainer.train()
    return {"steps": trainer.state.global_step, "tokens": trainer.state.global_step * batch_size * accumulation *
            context, "parameters": sum(t.numel() for t in model.parameters()), "train_loss": result.training_loss,
            "snapshots": dict(sorted(saver.saved.items()))}


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
