"""The pieces `train` plugs into the Hugging Face Trainer: arguments, schedule, atomic checkpoints, metrics.

The Trainer (accelerate underneath) brings mixed precision, DDP/FSDP, gradient accumulation, torch.compile,
trackers and resume with RNG state and data position; what GPT-2 pretraining needs on top of it is here:
- a warmup + cosine-to-10% schedule fitted to the run's real length (changeable once a --max-time run knows
  its speed),
- checkpoints written to a staging directory and renamed into place (a kill never leaves a half checkpoint),
- metrics.jsonl with tokens and tokens/s, eval perplexity and bits per byte, and loss.png redrawn at each eval.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from ..devices import is_main_process
from .config import TrainConfig
from .runs import update_run_config
from .schedule import WarmupCosine, warmup_steps_for


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


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class StepHealth(TrainerCallback):
    """Skips every optimizer update whose gradients are not finite (a NaN/inf loss gives such gradients), warns,
    and stops the run after MAX_IN_A_ROW such steps in a row.

    Why a guard on `optimizer.step` rather than on the loss: the Trainer clips first, and clipping a non-finite
    norm turns every gradient into NaN, so one check of the clipped gradients covers the loss, the norm and any
    overflow in backward. A skipped step leaves weights and optimizer state as they were (AdamW would otherwise
    write NaN into both); the schedule still advances, as with fp16 loss scaling.
    """

    MAX_IN_A_ROW = 5

    def __init__(self, sync: bool = False):
        self.sync = sync  # sharded gradients (FSDP): ranks must agree, so the verdict is all-reduced
        self.in_a_row = self.skipped = self.applied = 0
        self.first_bad_of_streak: int | None = None
        self.diverged = False
        self.state: Any = None

    def guard(self, optimizer: torch.optim.Optimizer) -> None:
        step = optimizer.step

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if self._gradients_finite(optimizer):
                self.in_a_row = 0
                self.applied += 1
                return step(*args, **kwargs)
            self.in_a_row += 1
            self.skipped += 1
            at = (self.state.global_step + 1) if self.state is not None else "?"
            if self.in_a_row == 1:
                self.first_bad_of_streak = at if isinstance(at, int) else None
            if is_main_process():
                print(f"warning: step {at}: non-finite loss or gradient, update skipped ({self.in_a_row} in a row; "
                      f"the run stops at {self.MAX_IN_A_ROW})", file=sys.stderr)
            return None

        optimizer.step = guarded_step  # type: ignore[method-assign]

    def _gradients_finite(self, optimizer: torch.optim.Optimizer) -> bool:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.isfinite(torch.nn.utils.get_total_norm(grads)) if grads else torch.tensor(True)
        if self.sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = finite.float()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            return bool(flag)
        return bool(finite)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.state = state

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.in_a_row >= self.MAX_IN_A_ROW:
            self.diverged = True
            control.should_training_stop = True
            control.should_save = False  # the checkpoints from before the streak are the good ones
        elif state.global_step >= state.max_steps:
            control.should_save = True  # the last step is always checkpointed: a finished run can be extended


class StopOnSignal(TrainerCallback):
    """SIGTERM (preemption, Slurm's time limit), SIGINT (Ctrl-C) and SIGUSR1 save a checkpoint at the end of the
    current step and stop the run; a second Ctrl-C stops at once. Under DDP/FSDP the ranks agree (all-reduce)
    on whether any of them was signalled, so they all save the same step and none waits for the others."""

    SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        self.signal = signum
        if is_main_process():
            print(f"\n{signal.Signals(signum).name} received: saving a checkpoint at the end of this step, then "
                  "stopping (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import threading

        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        stop = self.signal is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(stop)], device="cuda" if torch.cuda.is_available() else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.signal is None:
                self.signal = signal.SIGTERM  # another rank was signalled (torchrun forwards SIGTERM)
        if stop:
            control.should_save = True
            control.should_training_stop = True


class GPT2Trainer(Trainer):
    def __init__(self, *args: Any, schedule: WarmupCosine, keep_checkpoints: int, tokens_per_step: int,
                 bytes_per_token: float, health: StepHealth | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.schedule, self.keep_checkpoints = schedule, keep_checkpoints
        self.tokens_per_step, self.bytes_per_token = tokens_per_step, bytes_per_token
        self.health = health
        self._last_log: tuple[float, int] | None = None

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.health is not None and not getattr(optimizer, "_gpt2_dutch_guarded", False):
            self.health.guard(optimizer)
            optimizer._gpt2_dutch_guarded = True  # type: ignore[attr-defined]
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.schedule)
        return self.lr_scheduler

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        step = self.state.global_step
        logs["tokens"] = step * self.tokens_per_step
        if self.health is not None and self.health.skipped:
            # The Trainer's running loss leaves a NaN step out of its average (logging_nan_inf_filter); the
            # count of steps whose update was skipped says that it happened.
            logs["skipped_steps"] = self.health.skipped
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
        if not weights_finite(self.model):  # never let NaN weights rotate a good checkpoint out
            if self.args.should_save:
                print(f"warning: step {self.state.global_step}: the weights are not finite; no checkpoint written",
                      file=sys.stderr)
            return
        root = self.args.output_dir
        staging = os.path.join(root, ".staging")
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a full disk or a kill mid-write: nothing half-written
            raise
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
        # NaN and infinities are not JSON: they are written as null (a skipped step's loss, a gradient overflow)
        record = {"step": state.global_step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                               for k, v in logs.items() if k != "epoch"}}
        if "learning_rate" in record:
            record["lr"] = record.pop("learning_rate")
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
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
            changes: dict[str, Any] = {"total_steps": total, "seconds_per_step": round(per_step, 4)}
            if total < self.upper_bound:  # the budget, not --max-steps/--max-tokens, ends this run
                changes["length_set_by"] = "max_time"
            update_run_config(self.run_dir, **changes)
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
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill: skip it
            records.append(json.loads(line))
    train = [(r["tokens"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["tokens"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
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
