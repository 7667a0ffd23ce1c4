"""The pieces `train` plugs into the Hugging Face Trainer: arguments, schedule, atomic checkpoints, metrics.

The Trainer (accelerate underneath) brings mixed precision, DDP/FSDP, gradient accumulation, torch.compile,
trackers and resume with RNG state and data position; what GPT-2 pretraining needs on top of it is here:
- a warmup + cosine-to-10% schedule fitted to the run's real length (changeable once a --max-time run knows
  its speed),
- checkpoints written to a staging directory and renamed into place (a kill never leaves a half checkpoint),
- metrics.jsonl with tokens and tokens/s, eval perplexity and bits per byte, and loss.png redrawn at each eval.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from .train import TrainConfig, WarmupCosine, is_main_process, warmup_steps_for, write_json_atomic


def build_training_arguments(cfg: TrainConfig, run_dir: Path, precision: str, lr: float, total_steps: int,
                             eval_every: int, save_every: int, log_every: int) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=lr,
        weight_decay=cfg.weight_decay,  # the Trainer exempts biases and LayerNorm weights: matrices only
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_steps=total_steps,
        logging_steps=log_every,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=save_every,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        torch_compile=cfg.compile,
        activation_checkpointing=cfg.gradient_checkpointing,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_drop_last=True,
        dataloader_num_workers=cfg.num_workers,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation averages the loss; logits are never accumulated
        ddp_find_unused_parameters=False,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        fsdp="full_shard auto_wrap" if cfg.fsdp else "",
        fsdp_config={"transformer_layer_cls_to_wrap": ["GPT2Block"]} if cfg.fsdp else None,
        disable_tqdm=not is_main_process(),
    )


class GPT2Trainer(Trainer):
    def __init__(self, *args: Any, schedule: WarmupCosine, keep_checkpoints: int, tokens_per_step: int,
                 bytes_per_token: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.schedule, self.keep_checkpoints = schedule, keep_checkpoints
        self.tokens_per_step, self.bytes_per_token = tokens_per_step, bytes_per_token
        self._last_log: tuple[float, int] | None = None

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.schedule)
        return self.lr_scheduler

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        step = self.state.global_step
        logs["tokens"] = step * self.tokens_per_step
        if "loss" in logs:
            now = time.perf_counter()
            if self._last_log is not None and step > self._last_log[1]:
                logs["tokens_per_s"] = round((step - self._last_log[1]) * self.tokens_per_step
                                             / (now - self._last_log[0]), 1)
            self._last_log = (now, step)
        if "eval_loss" in logs:
            loss = logs["eval_loss"]
            logs["eval_ppl"] = math.exp(min(loss, 50.0))
            logs["eval_bpb"] = loss / math.log(2) / self.bytes_per_token
            if self._last_log is not None:  # evaluation time is not training time
                self._last_log = (time.perf_counter(), self._last_log[1])
        super().log(logs, start_time)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write into checkpoints/.staging, then rename: checkpoint-N exists only once it is complete."""
        root = self.args.output_dir
        staging = os.path.join(root, ".staging")
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = root
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            target = os.path.join(root, name)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
            shutil.rmtree(staging, ignore_errors=True)
            checkpoints = sorted(Path(root).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            for old in checkpoints[: -self.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()


class MetricsCallback(TrainerCallback):
    """Appends every log record to metrics.jsonl and redraws loss.png at each evaluation and at the end."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if k != "epoch"}}
        if "learning_rate" in record:
            record["lr"] = record.pop("learning_rate")
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if "eval_loss" in logs:
            plot_losses(self.run_dir)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.is_world_process_zero:
            plot_losses(self.run_dir)


class MaxTimeCallback(TrainerCallback):
    """Fits the step count to a wall-clock budget once the speed of the first steps is known."""

    def __init__(self, budget_s: float, schedule: WarmupCosine, warmup: float, run_dir: Path, upper_bound: int,
                 auto_eval: bool, auto_save: bool):
        self.budget_s, self.schedule, self.warmup, self.run_dir = budget_s, schedule, warmup, run_dir
        self.upper_bound, self.auto_eval, self.auto_save = upper_bound, auto_eval, auto_save
        self.start = self.after_first = 0.0
        self.fitted = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.start = time.perf_counter()
        self.fitted = state.global_step > 0  # a resumed run keeps the step count fitted before

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.fitted:
            return
        now = time.perf_counter()
        if state.global_step == 1:
            self.after_first = now  # the first step pays for warm-up/compilation: not representative
            return
        measured = state.global_step - 1
        if measured < 3 and now - self.start < 0.05 * self.budget_s:
            return
        per_step = (now - self.after_first) / measured
        total = state.global_step + int(max(0.0, self.budget_s - (now - self.start)) / per_step)
        total = max(state.global_step, min(self.upper_bound, total))
        self.schedule.total_steps = total
        self.schedule.warmup_steps = warmup_steps_for(self.warmup, total)
        state.max_steps = args.max_steps = total
        every = max(1, total // 10)
        if self.auto_eval:
            state.eval_steps = args.eval_steps = every
        if self.auto_save:
            state.save_steps = args.save_steps = every
        state.logging_steps = args.logging_steps = max(1, total // 100)
        self.fitted = True
        if state.is_world_process_zero:
            path = self.run_dir / "run_config.json"
            saved = json.loads(path.read_text())
            saved.update(total_steps=total, seconds_per_step=round(per_step, 4))
            if total < self.upper_bound:  # the budget, not --max-steps/--max-tokens, ends this run
                saved["length_set_by"] = "max_time"
            write_json_atomic(path, saved)
        bar = getattr(self, "progress", None)
        if bar is not None and getattr(bar, "training_bar", None) is not None:
            bar.training_bar.total = total
            bar.training_bar.refresh()


def metrics_callbacks(cfg: TrainConfig, run_dir: Path, run_info: dict[str, Any], manifest: dict[str, Any],
                      schedule: WarmupCosine, auto_eval: bool, auto_save: bool) -> list[TrainerCallback]:
    callbacks: list[TrainerCallback] = [MetricsCallback(run_dir)]
    if cfg.max_time_s:
        bound = cfg.max_steps or (math.ceil(cfg.max_tokens / run_info["tokens_per_step"]) if cfg.max_tokens
                                  else run_info["total_steps"])
        callbacks.append(MaxTimeCallback(cfg.max_time_s, schedule, cfg.warmup, run_dir, bound, auto_eval, auto_save))
    return callbacks


def attach_progress_bar(trainer: Trainer) -> None:
    """Let the --max-time callback correct the progress bar's total once the step count is fitted."""
    progress = next((c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)), None)
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, MaxTimeCallback):
            cb.progress = progress  # type: ignore[attr-defined]


def plot_losses(run_dir: Path) -> None:
    """Draw train and eval loss against tokens into loss.png (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["tokens"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, run_dir / "loss.png")
