"""The pieces `train` plugs into the Hugging Face Trainer: arguments, schedule, atomic checkpoints, metrics.

The Trainer (accelerate underneath) brings mixed precision, DDP/FSDP, gradient accumulation, torch.compile,
trackers and resume with RNG state and data position; what GPT-2 pretraining needs on top of it is here:
- the learning-rate schedule (warmup, then wsd's stable peak and linear cooldown by default, or cosine) fitted
  to the run's real length (refitted once a --max-time run knows its speed),
- checkpoints written to a staging directory and renamed into place (a kill never leaves a half checkpoint),
- the optimizer options set per step (--muon-momentum-warmup) and the weight average (--ema-horizon) that
  becomes final_model,
- metrics.jsonl with tokens and tokens/s, eval perplexity and bits per byte, and loss.png redrawn at each eval,
- a calm console: one progress bar with the live figures, one line per evaluation (or JSON lines, or quiet).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from gpt2_dutch.core.devices import is_main_process
from gpt2_dutch.core.files import replace_dir, write_bytes_atomic
from gpt2_dutch.runs.records import METRICS, read_metrics, read_run_config, update_run_config
from gpt2_dutch.train.plan import PROVISIONAL_STEPS, UNFITTED, TrainPlan
from gpt2_dutch.train.schedule import Schedule, warmup_steps_for


def build_training_arguments(plan: TrainPlan, run_dir: Path) -> TrainingArguments:
    """The Trainer's arguments: the plan's settings in its terms."""
    cfg = plan.cfg
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,  # the Trainer exempts biases and LayerNorm weights: matrices only
        adam_beta1=cfg.adam_beta1,  # the plan's: ADAM_BETAS for a new run, a resumed run's own
        adam_beta2=cfg.adam_beta2,
        max_grad_norm=1.0,
        max_steps=plan.total_steps,
        logging_steps=plan.log_every,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=plan.eval_every,
        save_strategy="steps",
        save_steps=plan.save_every,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=not cuda,
        torch_compile=cfg.compile,
        activation_checkpointing=cfg.gradient_checkpointing,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_drop_last=True,
        dataloader_num_workers=cfg.dataloader_workers,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation averages the loss; logits are never accumulated
        ddp_find_unused_parameters=False,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        # FSDP2, each GPT2Block its own unit, parameters resharded after the forward (ZeRO-3): the public form
        # (fsdp=True + fsdp_config) of what the deprecated string "full_shard auto_wrap" said
        fsdp=True if cfg.fsdp else None,
        fsdp_config={"transformer_layer_cls_to_wrap": ["GPT2Block"], "reshard_after_forward": True} if cfg.fsdp
        else None,
        disable_tqdm=True,  # the bar is ConsoleCallback's (install_console removes the Trainer's printing)
    )


def say(message: str) -> None:
    """One whole line on stderr: a progress bar being drawn is cleared first and redrawn below it, so warnings
    never end up inside the bar's line."""
    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


def max_over_ranks(values: tuple[float, ...]) -> tuple[float, ...]:
    """Each of `values` as the largest of all ranks' (under DDP/FSDP; as given otherwise), so that every rank
    takes the same decision at the same step."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    both = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    return tuple(both.tolist())


def weights_finite(model: torch.nn.Module, sync: bool = False) -> bool:
    """Every weight finite. `sync` (FSDP: each rank holds a shard) all-reduces the verdict, so every rank takes
    the same branch: one rank skipping a save that the others enter would hang their collectives."""
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([float(finite)], device=next(model.parameters()).device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = bool(flag.item())
    return finite


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
                say(f"warning: step {at}: non-finite loss or gradient, update skipped ({self.in_a_row} in a row; "
                    f"the run stops at {self.MAX_IN_A_ROW})")
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
            # tqdm's write lock is re-entrant, so writing from the handler cannot deadlock on a redraw it interrupted
            say(f"{signal.Signals(signum).name} received: saving a checkpoint at the end of this step, then "
                "stopping (Ctrl-C again to stop at once)")

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
        (stop,) = max_over_ranks((float(self.signal is not None),))
        if stop and self.signal is None:
            self.signal = signal.SIGTERM  # another rank was signalled (torchrun forwards SIGTERM)
        if stop:
            control.should_save = True
            control.should_training_stop = True


class MuonMomentumWarmup(TrainerCallback):
    """--muon-momentum-warmup: sets the momentum of Muon's param groups before each optimizer step, from the step
    alone (muon.muon_momentum), so a resumed run gets the momentum the straight run had at every step; the
    momentum optimizer.pt brings back is overwritten before it is used. A fraction of the run follows the
    schedule's length: a --max-time run warms up as a PROVISIONAL_STEPS run until its length is fitted, as its
    learning rate does."""

    def __init__(self, warmup: float, schedule: Schedule):
        self.warmup, self.schedule = warmup, schedule

    def warmup_steps(self) -> int:
        total = self.schedule.total_steps
        return warmup_steps_for(self.warmup, PROVISIONAL_STEPS if total >= UNFITTED else total)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        from gpt2_dutch.train.muon import muon_momentum

        momentum = muon_momentum(state.global_step, self.warmup_steps())
        for group in optimizer.param_groups:
            if group.get("use_muon"):
                group["momentum"] = momentum


class WeightEMA(TrainerCallback):
    """--ema-horizon: an exponential moving average of the weights, updated after every optimizer step, that
    becomes final_model (GPT2Trainer.train swaps it in at the run's end and evaluates it).

    Each step's weights enter with 1/H of the average, H the horizon in steps (a fraction of the run's current
    length if < 1, so a --max-time refit moves it as it moves the cooldown); until a --max-time run's length is
    fitted the average simply follows the weights. The average is fp32 and is saved in every checkpoint
    (EMA_FILE, safetensors), so a resumed run continues the very average the straight run has: exact resume.
    Why an average at all: late in a run the weights jitter around a point of lower loss than any one step's
    (modded-nanogpt's optimization-track record #45 reads out an EMA of the last ~150 steps)."""

    EMA_FILE = "ema.safetensors"

    def __init__(self, horizon: float, schedule: Schedule):
        self.horizon, self.schedule = horizon, schedule
        self.average: dict[str, torch.Tensor] | None = None

    def weight_of_new_step(self) -> float:
        total = self.schedule.total_steps
        if total >= UNFITTED:
            return 1.0
        steps = self.horizon * total if self.horizon < 1 else self.horizon
        return 1.0 / max(1.0, steps)

    @torch.no_grad()
    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        params = dict(model.named_parameters())
        if self.average is None:  # the first step of a new run: the average starts at its weights
            self.average = {name: p.detach().float().clone() for name, p in params.items()}
            return
        weight = self.weight_of_new_step()
        for name, p in params.items():
            self.average[name].lerp_(p.detach().float(), weight)

    def save(self, checkpoint: Path) -> None:
        from safetensors.torch import save_file

        if self.average is not None:
            save_file({name: t.contiguous() for name, t in self.average.items()}, str(checkpoint / self.EMA_FILE))

    def load(self, checkpoint: Path, model: Any) -> None:
        """The average saved with `checkpoint`; a checkpoint without one, or with other tensors than the
        model's, is a one-line error (it was written without --ema-horizon, or is damaged)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from gpt2_dutch.core.errors import UsageError

        path = checkpoint / self.EMA_FILE
        try:
            average = load_file(str(path), device=str(next(model.parameters()).device))
        except (OSError, SafetensorError) as e:
            raise UsageError(f"cannot resume from {checkpoint}: its weight average {path.name} cannot be read "
                             f"({str(e).splitlines()[0][:120]}); pass an earlier checkpoint with --resume") from None
        names = {name for name, _ in model.named_parameters()}
        if set(average) != names:
            raise UsageError(f"cannot resume from {checkpoint}: {path.name} does not hold this model's weights; "
                             "pass an earlier checkpoint with --resume")
        self.average = average

    @torch.no_grad()
    def copy_into(self, model: Any) -> None:
        assert self.average is not None
        for name, p in model.named_parameters():
            p.copy_(self.average[name])


def scale_embedding_lr(optimizer: torch.optim.Optimizer, model: Any, scale: float) -> bool:
    """Move GPT-2's token and position embedding tables into a param group of their own, with `scale` times the
    learning rate of the group they were in (and its other settings); the schedule then scales that lr like
    every other. Before the first step only. False (nothing changed) where the tables are not among the
    optimizer's parameters as they are (FSDP's flattened ones).

    Why: a table's row moves only on the steps whose batch has its token, while the head and the blocks learn
    from every token; a higher rate for the tables learned more per step at the same speed (see the README's
    quality section), as in modded-nanogpt, which gives its embeddings ~75x its LM head's rate."""
    if scale == 1:
        return True
    unwrapped = getattr(model, "module", model)
    tables = [unwrapped.get_input_embeddings().weight, unwrapped.transformer.wpe.weight]
    wanted = {id(t) for t in tables}
    moved: list[tuple[dict[str, Any], list[torch.nn.Parameter]]] = []
    for group in optimizer.param_groups:
        if group.get("use_muon"):
            continue
        found = [p for p in group["params"] if id(p) in wanted]
        if found:
            group["params"] = [p for p in group["params"] if id(p) not in wanted]
            moved.append((group, found))
    if sum(len(found) for _, found in moved) != len(wanted):
        for group, found in moved:  # all or nothing
            group["params"].extend(found)
        return False
    for group, found in moved:
        settings = {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
        optimizer.add_param_group({**settings, "params": found, "lr": group["lr"] * scale})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    return True


class GPT2Trainer(Trainer):
    """The Hugging Face Trainer, set up from the run's plan: our optimizer and schedule, the chunked loss,
    bounded evaluations, bits per byte in the logs, atomic and rotated checkpoints."""

    def __init__(self, *args: Any, plan: TrainPlan, schedule: Schedule, health: StepHealth | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.cfg = plan.cfg
        self.embedding_lr_scale = cfg.embedding_lr_scale  # the embedding tables' lr / the other AdamW params' lr
        self.adamw_weight_decay = cfg.adamw_weight_decay  # Muon only: the decay of AdamW's matrices (None: args')
        self.eval_chunks = plan.eval_chunks  # test chunks per evaluation (0: all); a --max-time fit may change it
        self.loss_chunk_tokens = cfg.loss_chunk_tokens  # 0: the model's own loss over full logits (compute_loss)
        self.schedule, self.keep_checkpoints = schedule, cfg.keep_checkpoints
        self.tokens_per_step, self.bytes_per_token = plan.tokens_per_step, plan.bytes_per_token
        self.health = health
        self.optimizer_kind = plan.optimizer  # "adamw" (the Trainer's own) or "muon" (muon.MuonAdamW)
        self.chunks_per_step = plan.chunks_per_step
        self._last_log: tuple[float, int] | None = None
        self.first_step = _FirstStep()
        self.add_callback(self.first_step)
        if self.optimizer_kind == "muon" and cfg.muon_momentum_warmup:
            self.add_callback(MuonMomentumWarmup(cfg.muon_momentum_warmup, schedule))
        self.ema = WeightEMA(cfg.ema_horizon, schedule) if cfg.ema_horizon else None
        self.evaluating_ema = False
        if self.ema is not None:
            self.add_callback(self.ema)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.optimizer_kind == "muon":
            from gpt2_dutch.train.muon import NORMUON_BETA2, MuonAdamW, param_groups

            # set before super(), which then keeps it (and wraps it where it wraps its own)
            opt_model = self.model if model is None else model
            self.optimizer = MuonAdamW(param_groups(
                opt_model, self.args.learning_rate, self.args.weight_decay,
                betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
                decay_names=self.get_decay_parameter_names(opt_model), adamw_weight_decay=self.adamw_weight_decay,
                iteration=self.cfg.muon_iteration, normuon_beta2=NORMUON_BETA2 if self.cfg.normuon else 0.0,
                cautious_weight_decay=self.cfg.cautious_weight_decay),
                # a bf16 run's Newton-Schulz in bf16 on a CPU too (docs/experiments/optimizer.md); else its default
                ns_dtype=torch.bfloat16 if self.args.bf16 else None,
                split_across_ranks=self.args.world_size > 1)  # DDP: ranks share the iteration's work
        optimizer = super().create_optimizer(model)
        if not getattr(optimizer, "_gpt2_dutch_embedding_lr", False):  # once, before any step
            if (not scale_embedding_lr(optimizer, self.model if model is None else model, self.embedding_lr_scale)
                    and is_main_process()):
                say(f"--embedding-lr-scale {self.embedding_lr_scale:g}: not applied (the optimizer holds the "
                    "embedding tables flattened, as under FSDP); they learn at --learning-rate")
            optimizer._gpt2_dutch_embedding_lr = True  # type: ignore[attr-defined]
        if self.health is not None and not getattr(optimizer, "_gpt2_dutch_guarded", False):
            self.health.guard(optimizer)
            optimizer._gpt2_dutch_guarded = True  # type: ignore[attr-defined]
        return optimizer

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:
        """The Trainer's loop; with --ema-horizon the average comes back from the checkpoint first and, once the
        run has reached its last step, becomes the model's weights (what final_model saves) and is evaluated:
        the run's last evaluation is the published model's. A run stopped early keeps its own weights."""
        if self.ema is not None and resume_from_checkpoint:
            self.ema.load(Path(resume_from_checkpoint), self.model)
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        diverged = self.health is not None and self.health.diverged
        if (self.ema is not None and self.ema.average is not None and not diverged
                and self.state.global_step >= self.state.max_steps):
            self.ema.copy_into(self.model)
            self.evaluating_ema = True
            try:
                self.evaluate()
            finally:
                self.evaluating_ema = False
        return result

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """The LM head's loss without full logits (loss.py), or the Trainer's own with --loss-chunk-tokens 0.

        The model is called through `model`, the wrapped one (DDP, compile), so its forward hooks run as always;
        `logits_to_keep=1` makes GPT-2 project only the last position (batch x vocab, unused) and
        `output_hidden_states` hands back the final hidden states (after ln_f). The head's weight is the
        unwrapped model's own parameter. Tied to the token embedding, its gradient from the loss reaches the
        same AccumulateGrad as the embedding's, and autograd runs that node once, with the sum, so DDP's
        gradient hook (on that node) fires once and all-reduces the full gradient; untied, it has its own node.
        FSDP keeps the weight sharded outside the forward, so it keeps the plain path.
        """
        if (not self.loss_chunk_tokens or "labels" not in inputs or self.is_fsdp_enabled
                or self.label_smoother is not None or self.compute_loss_func is not None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from gpt2_dutch.train.loss import IGNORE_INDEX, lm_head_loss_sum

        labels = inputs["labels"]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=1,
                        output_hidden_states=True)
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        # accelerate runs only the model's forward under autocast (and hands its outputs back in fp32): the head
        # gets the same mixed precision as the plain path's lm_head inside the forward (without this it ran in
        # fp32 and slower: docs/experiments/throughput.md).
        with self.accelerator.autocast():
            loss = lm_head_loss_sum(outputs.hidden_states[-1], weight, labels, self.loss_chunk_tokens)
        # the same normalisation as the model's own loss under the Trainer: a sum over the tokens of every
        # micro-batch of the step (num_items_in_batch; all ranks' with average_tokens_across_devices, hence the
        # factor of ranks, which DDP's gradient mean divides out again), else a mean over this batch
        if num_items_in_batch is None:
            loss = loss / (labels[:, 1:] != IGNORE_INDEX).sum().clamp_min(1)
        else:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset: Any = None, *args: Any, **kwargs: Any) -> dict[str, float]:
        """The Trainer's evaluation, on the first --eval-chunks chunks of the test split (the same ones each time,
        so the evaluations of a run are comparable)."""
        if eval_dataset is None and self.eval_dataset is not None:
            # Evaluation batches are whole (dataloader_drop_last): a test split smaller than one batch would give
            # no loss at all, and a limit that is not a multiple of the batch would score fewer chunks than asked.
            batch = self.args.per_device_eval_batch_size * self.args.world_size
            available = len(self.eval_dataset)
            if 0 < available < batch:
                self.args.per_device_eval_batch_size = max(1, available // self.args.world_size)
                batch = self.args.per_device_eval_batch_size * self.args.world_size
            if self.eval_chunks and available > self.eval_chunks:
                n = min(available, max(batch, -(-self.eval_chunks // batch) * batch))  # whole batches, rounded up
                eval_dataset = self.eval_dataset.select(range(n))
        return super().evaluate(eval_dataset, *args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        if self.lr_scheduler is None:
            # A plain function, not the schedule object: LambdaLR saves a callable object's __dict__ in
            # scheduler.pt and puts it back on resume, which would undo a refit (an extended run's new length).
            # The schedule is rebuilt from run_config.json on resume, so nothing needs restoring.
            schedule = self.schedule
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer,
                                                                  lambda step: schedule(step))
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
        if logs.get("train_runtime"):
            # The Trainer counts the steps it planned at the start (a --max-time run's 10**9 bound, or a resumed
            # run's whole length): the rates of what this call trained are the steps it did take.
            took = step - self.first_step.step
            logs["train_samples_per_second"] = round(took * self.chunks_per_step / logs["train_runtime"], 3)
            logs["train_steps_per_second"] = round(took / logs["train_runtime"], 3)
        if "eval_loss" in logs:
            loss = logs["eval_loss"]
            if self.evaluating_ema:
                logs["weights"] = "ema"  # the evaluation of the weight average (final_model), not of the weights
            logs["eval_ppl"] = math.exp(min(loss, 50.0))
            logs["eval_bpb"] = loss / math.log(2) / self.bytes_per_token
            if self._last_log is not None:  # evaluation time is not training time
                self._last_log = (time.perf_counter(), self._last_log[1])
        super().log(logs, start_time)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write into checkpoints/.staging, then rename: checkpoint-N exists only once it is complete.

        Why the rotation is ours and not the Trainer's `save_total_limit`: the Trainer rotates at the end of its
        `_save_checkpoint`, over the directory that call writes to. Staging means that call writes to
        `.staging`, so its rotation would see only the new checkpoint; pointed at checkpoints/ instead, it
        would run while the new checkpoint is not yet renamed into place, and every partial write would carry
        the final name. It also protects "the newest" by modification time, falling back to step numbers when
        the times are within a second: after resuming from an older checkpoint, a leftover checkpoint with a
        higher step counts as the newest and the one just written, the newest complete one, can be deleted.
        Here the checkpoint just written is always kept (tests/unit/train/test_trainer.py shows both guarantees).
        """
        if not weights_finite(self.model, sync=self.is_fsdp_enabled):  # NaN weights never rotate a good one out
            if self.args.should_save:
                say(f"warning: step {self.state.global_step}: the weights are not finite; no checkpoint written")
            return
        root = self.args.output_dir
        # One name shared by all ranks (each writes its own RNG state and shards into it), so not files.temp_name
        staging = os.path.join(root, ".staging")
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a kill mid-save left must not mix into this one
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a full disk or a kill mid-write: nothing half-written
            raise
        finally:
            self.args.output_dir = root
        if self.ema is not None and self.args.should_save:  # inside the staged checkpoint: renamed with it
            self.ema.save(Path(staging) / f"checkpoint-{self.state.global_step}")
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = Path(root) / f"checkpoint-{self.state.global_step}"
            replace_dir(Path(staging) / target.name, target)  # a checkpoint of the same step: old one kept till then
            shutil.rmtree(staging, ignore_errors=True)
            self._prune_checkpoints(target)
        self.accelerator.wait_for_everyone()

    def _prune_checkpoints(self, newest: Path) -> None:
        """Keep `keep_checkpoints` in all: `newest`, the checkpoint just written, and the others with the highest
        steps. A leftover with a higher step than `newest` (a run resumed from an older checkpoint) is one of
        those others: it is never kept at the expense of the checkpoint just written."""
        others = sorted((p for p in newest.parent.glob("checkpoint-*")
                         if p != newest and p.name.split("-")[-1].isdigit()), key=lambda p: int(p.name.split("-")[-1]))
        for old in others[: max(0, len(others) - (self.keep_checkpoints - 1))]:
            shutil.rmtree(old, ignore_errors=True)


class _FirstStep(TrainerCallback):
    """The step a `train()` call starts from (0, or a resumed checkpoint's)."""

    step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.step = state.global_step


def metrics_record(state: Any, logs: dict[str, Any]) -> dict[str, Any]:
    """One log/eval record as metrics.jsonl (and --log-format json) holds it: strict JSON, `lr`, the step."""
    # NaN and infinities are not JSON: they are written as null (a skipped step's loss, a gradient overflow)
    record = {"step": state.global_step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                           for k, v in logs.items() if k != "epoch"}}
    if "learning_rate" in record:
        record["lr"] = record.pop("learning_rate")
    return record


class MetricsCallback(TrainerCallback):
    """Appends every log record to metrics.jsonl and redraws loss.png at each evaluation and at the end."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics_record(state, logs), allow_nan=False) + "\n")
        if "eval_loss" in logs:
            plot_losses(self.run_dir)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.is_world_process_zero:
            plot_losses(self.run_dir)


class ConsoleCallback(TrainerCallback):
    """What training shows on stderr, in place of the Trainer's ProgressCallback (which prints every log record
    as a raw dict between the bar's redraws). Rank 0 only.

    - `text`: one progress bar whose postfix holds the live figures (loss, lr, tokens/s; tqdm's own remaining
      time is the eta), one line per evaluation, and a bar for the evaluation batches that disappears after.
    - `json`: one JSON object per line per log/eval record, the very records of metrics.jsonl: for clusters
      and scripts, where a bar's carriage returns make a log file unreadable.
    - `quiet`: nothing; warnings (`say`) and the run's final line still come.
    The raw records go to metrics.jsonl and the trackers, never to the terminal.
    """

    def __init__(self, mode: str = "text", fitting: MaxTimeCallback | None = None):
        assert mode in ("text", "json", "quiet"), mode
        self.mode, self.fitting = mode, fitting
        self.training_bar: Any = None
        self.eval_bar: Any = None
        self.shown_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.mode != "text" or not state.is_world_process_zero:
            return
        # a --max-time run knows its length only after its first steps: no total (no eta) until then
        pending = self.fitting is not None and not self.fitting.fitted
        self.training_bar = tqdm(total=None if pending else state.max_steps, initial=state.global_step,
                                 unit="step", dynamic_ncols=True, file=sys.stderr)
        self.shown_step = state.global_step

    def set_total(self, total: int) -> None:
        """The --max-time callback fitted the run's length."""
        if self.training_bar is not None:
            self.training_bar.total = total
            self.training_bar.refresh()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.training_bar is not None:
            self.training_bar.update(state.global_step - self.shown_step)
            self.shown_step = state.global_step

    def on_prediction_step(self, args: Any, state: Any, control: Any, eval_dataloader: Any = None,
                           **kw: Any) -> None:
        if self.mode != "text" or not state.is_world_process_zero:
            return
        if self.eval_bar is None:
            total = len(eval_dataloader) if hasattr(eval_dataloader, "__len__") else None
            self.eval_bar = tqdm(total=total, desc="evaluating", unit="batch", leave=False, dynamic_ncols=True,
                                 file=sys.stderr)
        self.eval_bar.update(1)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._close_eval_bar()

    def _close_eval_bar(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs or self.mode == "quiet":
            return
        if self.mode == "json":
            print(json.dumps(metrics_record(state, logs), allow_nan=False), file=sys.stderr, flush=True)
            return
        if "eval_loss" in logs:
            self._close_eval_bar()
            say(eval_line(state.global_step, logs))
        if "loss" in logs and self.training_bar is not None:
            figures = [f"loss={logs['loss']:.4g}"]
            if "learning_rate" in logs:
                figures.append(f"lr={logs['learning_rate']:.3g}")
            if "tokens_per_s" in logs:
                figures.append(f"tok/s={logs['tokens_per_s']:,.0f}")
            self.training_bar.set_postfix_str(", ".join(figures))

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the bars (also when training ends with an exception, so none is redrawn after the error)."""
        self._close_eval_bar()
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers draws a bar of its own ("Writing model shards") at every checkpoint and at the final save: a
    second bar under ours, or text among the JSON lines. Off while a run trains and saves."""
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def eval_line(step: int, logs: dict[str, Any]) -> str:
    line = f"step {step}: eval loss {logs['eval_loss']:.4f}"
    if "eval_bpb" in logs:
        line += f", {logs['eval_bpb']:.3f} bits/byte"
    if "eval_ppl" in logs:
        line += f" (perplexity {logs['eval_ppl']:.4g})"
    if logs.get("weights") == "ema":
        line += ", the weight average (final_model)"
    return line


class MaxTimeCallback(TrainerCallback):
    """Fits the step count to a wall-clock budget once the speed of the first steps is known, and, while the
    schedule allows it (wsd's stable phase: `can_change_length`), refits it at every REFIT_EVERY of the budget
    from the speed measured so far. Why refit: the first fit sees ~5% of the run, and on a shared machine
    or as data and evaluations settle the speed drifts (docs/experiments/budget.md)."""

    REFIT_EVERY = 0.1  # of the budget

    def now(self) -> float:
        """The budget's clock (a method, so a test can replace it with a fake one)."""
        return time.perf_counter()

    def __init__(self, budget_s: float, schedule: Schedule, warmup: float, run_dir: Path, upper_bound: int,
                 auto_eval: bool, auto_save: bool):
        self.budget_s, self.schedule, self.warmup, self.run_dir = budget_s, schedule, warmup, run_dir
        self.upper_bound, self.auto_eval, self.auto_save = upper_bound, auto_eval, auto_save
        # the budget's clock: seconds of training steps (from one step's end to the next's, or from its own
        # start when an evaluation or a checkpoint came between: those come on top of the budget)
        self.clock = self.after_first = self.last_end = self.step_began = 0.0
        self.paused = False
        self.first_step: int | None = None
        self.fitted = False
        self.refitting = False  # after the first fit, while the schedule can still change length
        self.next_refit = 0.0  # seconds into the run
        self.limit_before_fit: str | None = None  # run_config's length_set_by as the run started
        self.console: ConsoleCallback | None = None  # its bar's total is corrected once the length is fitted
        self.fit_listeners: list[Callable[[int], None]] = []  # called with the first fitted step count (all ranks)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.clock, self.last_end, self.paused = 0.0, self.now(), False
        # A resumed run keeps the step count fitted before; one stopped before its fit measures now.
        saved = read_run_config(self.run_dir)
        self.fitted, self.refitting = "seconds_per_step" in saved, False
        self.limit_before_fit = saved.get("length_set_by")
        self.first_step = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.step_began = self.now()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.paused = True

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.paused = True

    def _elapsed(self) -> tuple[float, float]:
        """Seconds of training since the start and since the first step; under DDP/FSDP the largest of all
        ranks', so every rank fits the same length at the same step (a rank stepping once more would wait for
        the others forever)."""
        since_start, since_first = max_over_ranks((self.clock, self.clock - self.after_first))
        return since_start, since_first

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.fitted and not self.refitting:
            return
        now = self.now()
        self.clock += now - (self.step_began if self.paused else self.last_end)
        self.last_end, self.paused = now, False
        if self.first_step is None:  # step 1, or the first after a resume
            self.first_step, self.after_first = state.global_step, self.clock  # it pays for warm-up
            return
        since_start, since_first = self._elapsed()
        measured = state.global_step - self.first_step
        if not self.fitted and measured < 3 and since_start < 0.05 * self.budget_s:
            return
        if self.refitting and since_start < self.next_refit:
            return
        per_step = since_first / measured
        total = state.global_step + int(max(0.0, self.budget_s - since_start) / per_step)
        total = max(state.global_step, min(self.upper_bound, total))
        every = self.REFIT_EVERY * self.budget_s
        self.next_refit = (math.floor(since_start / every) + 1) * every
        if not self.fitted:
            self.fitted = True
            self.schedule.warmup_steps = warmup_steps_for(self.warmup, total)
            self._set_length(total, per_step, args, state, control)
            for listener in self.fit_listeners:
                listener(total)
        elif total != self.schedule.total_steps:
            if not self.schedule.can_change_length(state.global_step, total):
                self.refitting = False  # in (or about to enter) the cooldown: the length stays
                return
            self._set_length(total, per_step, args, state, control)
        self.refitting = self.schedule.can_change_length(state.global_step, self.schedule.total_steps)

    def _set_length(self, total: int, per_step: float, args: Any, state: Any, control: Any) -> None:
        self.schedule.total_steps = total
        state.max_steps = args.max_steps = total
        every = max(1, total // 10)
        if self.auto_eval:
            state.eval_steps = args.eval_steps = every
        if self.auto_save:
            state.save_steps = args.save_steps = every
        state.logging_steps = args.logging_steps = max(1, total // 100)
        if state.global_step >= total:
            # the budget is already spent: the Trainer's own check of max_steps ran before this one, so stop and
            # checkpoint the last step here (else it trains one step past the fitted length)
            control.should_training_stop = control.should_save = True
        if state.is_world_process_zero:
            # the budget, not --max-steps/--max-tokens, ends this run unless the bound was reached
            limit = "max_time" if total < self.upper_bound else self.limit_before_fit
            update_run_config(self.run_dir, total_steps=total, seconds_per_step=round(per_step, 4),
                              **({"length_set_by": limit} if limit else {}))
        if self.console is not None:
            self.console.set_total(total)


def metrics_callbacks(plan: TrainPlan, run_dir: Path, schedule: Schedule) -> list[TrainerCallback]:
    callbacks: list[TrainerCallback] = [MetricsCallback(run_dir)]
    if plan.budget_s:
        callbacks.append(MaxTimeCallback(plan.budget_s, schedule, plan.cfg.warmup, run_dir, plan.step_bound,
                                         auto_eval=plan.cfg.eval_every is None, auto_save=plan.cfg.save_every is None))
    return callbacks


def install_console(trainer: Trainer, mode: str) -> ConsoleCallback:
    """Put our ConsoleCallback in place of the Trainer's own printing: ProgressCallback, or PrinterCallback
    (which it adds instead under `disable_tqdm`), both of which print every log record as a raw dict."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    fitting = next((c for c in trainer.callback_handler.callbacks if isinstance(c, MaxTimeCallback)), None)
    console = ConsoleCallback(mode, fitting)
    trainer.add_callback(console)
    if fitting is not None:
        fitting.console = console
    return console


def plot_losses(run_dir: Path) -> None:
    """Draw train and eval loss against tokens into loss.png (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (run_dir / METRICS).is_file():
        return
    records = read_metrics(run_dir)
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
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_bytes_atomic(run_dir / "loss.png", png.getvalue())
