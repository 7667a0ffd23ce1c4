"""`make_plan(cfg, manifest, ...)`: every setting of one training run, resolved once into a frozen `TrainPlan`.

From the config, the dataset's manifest, the budget and (on --resume) the run's own record, one function decides
the model size, the batch and accumulation, the learning rates, the optimizer, the schedule, the run's length,
the evaluation and checkpoint cadence, and what --resume / --init-from continue from, with every check that can
fail before anything is written. Building, fitting and publishing (run.py) and the trainer (trainer.py) read the
plan; nothing re-derives a setting later. Only a --max-time run's length (and what depends on it) is refitted
while it trains, from the speed it measures (trainer.MaxTimeCallback).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpt2_dutch.core.devices import is_main_process, resolve_precision, world_size
from gpt2_dutch.core.errors import UsageError, check, first_line
from gpt2_dutch.core.reading import read_json
from gpt2_dutch.model.loading import check_config, check_weights, read_header
from gpt2_dutch.model.presets import (
    MODEL_PRESETS,
    available_memory_bytes,
    check_fits,
    gpt2_config,
    preset,
    training_memory,
)
from gpt2_dutch.runs.records import (
    FINISHED,
    checkpoint_problem,
    checkpoint_step,
    latest_link,
    newest_unfinished_run,
    read_run_config,
    run_status,
    usable_checkpoint,
)
from gpt2_dutch.train.config import (
    ADAM_BETAS,
    EMBEDDING_LR_SCALE,
    MUON_ADAMW_WEIGHT_DECAY,
    TrainConfig,
    muon_options_off,
    resume_conflicts,
)
from gpt2_dutch.train.muon import resolve_optimizer
from gpt2_dutch.train.schedule import warmup_steps_for

MAX_CONTEXT = 16384  # dense attention beyond this needs more memory than any preset is sized for
PROVISIONAL_STEPS = 100  # the run length a --max-time run warms up for until its speed is measured
UNFITTED = 10**9  # the step count of a --max-time run until its speed is measured (an upper bound)
# An evaluation chunk costs about a third of a training chunk (forward only): scoring 3% of the run's training
# chunks at each of its ten evaluations costs about 10% of the training time (docs/experiments/budget.md).
EVAL_SHARE, EVAL_CHUNKS_MIN, EVAL_CHUNKS_MAX = 0.03, 16, 1000


@dataclass(frozen=True)
class ResumePoint:
    run_dir: Path
    checkpoint: Path
    total_steps: int
    extended_from: int | None  # the step a finished run had reached, when --max-steps extends it


@dataclass(frozen=True)
class TrainPlan:
    """One run, decided. `cfg` has every open setting filled in (size, batch, accumulation, learning rate,
    betas, decay, embedding scale, head tying): it is what run_config.json records."""

    cfg: TrainConfig
    model_config: Any  # transformers.GPT2Config of the model to train
    precision: str  # "bf16", "fp16" or "fp32"
    optimizer: str  # what trains: "muon" or "adamw"
    optimizer_notice: str | None  # why it differs from --optimizer (FSDP), printed once
    context: int
    vocab_size: int
    bytes_per_token: float  # of the test split: turns a loss into bits per byte
    tokens_per_step: int
    chunks_per_step: int
    total_steps: int  # UNFITTED for a --max-time run until its speed is measured
    length_set_by: str  # "max_steps", "max_tokens", "epochs" or "max_time"
    step_bound: int  # the most steps a --max-time fit may give (its --max-steps/--max-tokens, if any)
    warmup_steps: int
    eval_every: int
    save_every: int
    log_every: int
    eval_chunks: int  # test chunks per evaluation (0: all)
    budget_s: float | None  # --max-time's seconds for training: the speed probe's share taken out
    budget_choices: dict[str, Any] = field(default_factory=dict)  # what the budget chose, and why
    resume: ResumePoint | None = None
    init_source: Path | None = None  # the model --init-from loads

    @property
    def fitted_later(self) -> bool:
        return self.total_steps >= UNFITTED


def make_plan(cfg: TrainConfig, manifest: dict[str, Any], n_train_chunks: int, eos_token_id: int) -> TrainPlan:
    """Resolve every setting of the run described by `cfg` on the dataset `manifest` describes."""
    context, vocab_size = int(manifest["chunk_size"]), int(manifest["vocab_size"])
    check(context <= MAX_CONTEXT, f"the dataset's chunks are {context} tokens, longer than the {MAX_CONTEXT} "
          "this trainer allows; preprocess with a smaller --chunk-size (GPT-2 uses 1024)")
    precision = resolve_precision(cfg.precision)
    check_tracker(cfg.report_to)
    resume = resolve_resume(cfg, Path(cfg.output_dir)) if cfg.resume else None
    # --model-size auto and a batch left to the budget: a resumed run keeps what it chose (the same shape, and
    # the same batches so that its data position still means the same chunks); a new run chooses now, before
    # any seeded work, since measuring its speed builds models
    if resume is not None:
        cfg, choices = choices_of_resumed_run(cfg, read_run_config(resume.run_dir)), {}
    else:
        cfg, choices = choose_for_budget(cfg, vocab_size, context, eos_token_id, precision)
        cfg = _new_run_defaults(cfg)
    optimizer, notice = resolve_optimizer(cfg.optimizer, cfg.fsdp)
    if optimizer != cfg.optimizer:  # the record says what trained (AdamW under --fsdp), as the notice does
        cfg = replace(cfg, optimizer=optimizer, adamw_weight_decay=None, **muon_options_off())
    chunks_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size()
    tokens_per_step = chunks_per_step * context
    total_steps, limit = plan_steps(cfg, n_train_chunks, tokens_per_step)

    model_config = gpt2_config(cfg.model_size, vocab_size, context, eos_token_id, cfg.tie_embeddings)
    init_source = check_init_source(cfg, model_config)
    # a checkpoint or --init-from model keeps its own head: untying a tied one would leave lm_head random
    # (from_pretrained only warns), and tying an untied one would drop its trained head
    kept_from = resume.checkpoint if resume is not None else init_source
    if kept_from is not None:
        model_config.tie_word_embeddings = saved_tie_embeddings(kept_from)
        cfg = replace(cfg, tie_embeddings=model_config.tie_word_embeddings)
    if resume is not None:
        check_resumable(resume.checkpoint, cfg, manifest)
    if kept_from is not None:  # its safetensors header holds exactly the tensors of the model to build
        check_weights(check_config(model_config.to_dict(), f"--model-size {cfg.model_size}"), read_header(kept_from),
                      kept_from, config_name=f"--model-size {cfg.model_size}", fix="use the same --model-size and "
                      "a dataset made with the same tokenizer and --chunk-size")
    if resume is not None:
        total_steps = resume.total_steps
        if resume.extended_from is not None:
            limit = "max_steps"
    cfg = replace(cfg, learning_rate=cfg.learning_rate or preset(cfg.model_size).learning_rate)

    check_memory(cfg, model_config, optimizer, precision)
    unfitted = total_steps >= UNFITTED
    # A --max-time run knows its length only after its first steps: a warmup of 5% of the 10**9 bound would
    # train those steps at ~1e-10 of the peak. Until the fit it warms up as a 100-step run would; the fit then
    # sets the real warmup, and the cadences below (the schedule is a pure function of the step).
    auto_every = UNFITTED if unfitted else max(1, total_steps // 10)
    step_bound = cfg.max_steps or (math.ceil(cfg.max_tokens / tokens_per_step) if cfg.max_tokens else total_steps)
    return TrainPlan(
        cfg=cfg, model_config=model_config, precision=precision, optimizer=optimizer, optimizer_notice=notice,
        context=context, vocab_size=vocab_size, bytes_per_token=bytes_per_token(manifest),
        tokens_per_step=tokens_per_step, chunks_per_step=chunks_per_step, total_steps=total_steps,
        length_set_by=limit, step_bound=step_bound,
        warmup_steps=warmup_steps_for(cfg.warmup, PROVISIONAL_STEPS if unfitted else total_steps),
        eval_every=cfg.eval_every or auto_every, save_every=cfg.save_every or auto_every,
        log_every=cfg.log_every or (10 if unfitted else max(1, total_steps // 100)),
        eval_chunks=cfg.eval_chunks if cfg.eval_chunks is not None else auto_eval_chunks(total_steps,
                                                                                          chunks_per_step),
        # the seconds spent measuring speed for the budget's choices are part of the budget
        budget_s=cfg.max_time_s and max(1.0, cfg.max_time_s - choices.get("measuring_seconds", 0.0)),
        budget_choices=choices, resume=resume, init_source=init_source)


def check_memory(cfg: TrainConfig, model_config: Any, optimizer: str, precision: str) -> None:
    """Refuse up front, in one line, a run whose estimated peak memory (model.presets.training_memory: weights,
    gradients, optimizer state, one micro-batch's activations) exceeds what this device has free. FSDP shards
    the first three over the ranks; ranks that share one machine's memory (CPU DDP) each need their own."""
    import torch

    cuda = torch.cuda.is_available()
    parts = training_memory(model_config, cfg.batch_size * model_config.n_positions, optimizer, precision,
                            gradient_checkpointing=cfg.gradient_checkpointing,
                            loss_chunk_tokens=0 if cfg.fsdp else cfg.loss_chunk_tokens)
    need = parts["activations"] + (parts["weights"] + parts["gradients"] + parts["optimizer"]) // (
        world_size() if cfg.fsdp else 1)
    sharing = 1 if cuda else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    check_fits(need * sharing, available_memory_bytes("cuda" if cuda else "cpu"),
               f"training {cfg.model_size} with --batch-size {cfg.batch_size}"
               + (f" in {sharing} processes" if sharing > 1 else ""),
               "lower --batch-size (raise --gradient-accumulation-steps to keep the tokens per step), add "
               "--gradient-checkpointing, or pick a smaller --model-size")


def _new_run_defaults(cfg: TrainConfig) -> TrainConfig:
    """The defaults that depend on the optimizer, for a new run (a resumed one keeps its recorded values)."""
    kind = resolve_optimizer(cfg.optimizer, cfg.fsdp)[0]
    beta1, beta2 = ADAM_BETAS[kind]
    return replace(
        cfg, embedding_lr_scale=EMBEDDING_LR_SCALE if cfg.embedding_lr_scale is None else cfg.embedding_lr_scale,
        adam_beta1=beta1 if cfg.adam_beta1 is None else cfg.adam_beta1,
        adam_beta2=beta2 if cfg.adam_beta2 is None else cfg.adam_beta2,
        adamw_weight_decay=MUON_ADAMW_WEIGHT_DECAY if kind == "muon" and cfg.adamw_weight_decay is None
        else cfg.adamw_weight_decay)


def plan_steps(cfg: TrainConfig, n_train_chunks: int, tokens_per_step: int) -> tuple[int, str]:
    """The run's length in optimizer steps, and what set it."""
    per_epoch = n_train_chunks // (cfg.batch_size * world_size()) // cfg.gradient_accumulation_steps
    # Batches are whole (drop_last), so a split smaller than one step yields no batch at all: the run would
    # "finish" without a single update, whatever --max-steps says.
    check(per_epoch > 0, f"the training split has {n_train_chunks} chunks, fewer than one optimizer step needs "
          f"({cfg.batch_size * world_size() * cfg.gradient_accumulation_steps}); lower --batch-size / "
          "--gradient-accumulation-steps")
    if cfg.max_steps:
        return cfg.max_steps, "max_steps"
    if cfg.max_tokens:
        return max(1, math.ceil(cfg.max_tokens / tokens_per_step)), "max_tokens"
    steps = max(1, int(per_epoch * cfg.epochs))
    if cfg.max_time_s:  # an upper bound until the speed of the first steps is measured
        return UNFITTED, "max_time"
    return steps, "epochs"


def auto_eval_chunks(total_steps: int, chunks_per_step: int) -> int:
    """Test chunks per evaluation when --eval-chunks is not given (see EVAL_SHARE)."""
    return max(EVAL_CHUNKS_MIN, min(EVAL_CHUNKS_MAX, math.ceil(EVAL_SHARE * total_steps * chunks_per_step)))


def bytes_per_token(manifest: dict[str, Any]) -> float:
    test = manifest["splits"]["test"]
    return test["bytes"] / test["tokens"]


# ------------------------------------------------------------------------------------------ the budget

def choose_for_budget(cfg: TrainConfig, vocab_size: int, context: int, eos_token_id: int,
                      precision: str) -> tuple[TrainConfig, dict[str, Any]]:
    """Resolve --model-size auto, and a --batch-size and --learning-rate left open (budget.py); what was chosen
    and why."""
    from gpt2_dutch.train.budget import (
        DEFAULT_BATCH,
        StepCost,
        choose_batch,
        choose_batch_in_time,
        choose_learning_rate,
        choose_model_size,
        measure_optimizer_step_s,
        measure_tokens_per_s,
        train_flops,
    )

    choices: dict[str, Any] = {}
    budget_s, max_tokens, world = cfg.max_time_s, cfg.max_tokens, world_size()
    optimizer = resolve_optimizer(cfg.optimizer, cfg.fsdp)[0]
    speed, optimizer_s, cost = None, 0.0, None
    probe_s = 0.0
    if cfg.model_size == "auto":
        size = choose_model_size(vocab_size, context, eos_token_id, precision, max_tokens, budget_s,
                                 cfg.loss_chunk_tokens, world, cfg.tie_embeddings, optimizer=optimizer)
        cfg = replace(cfg, model_size=size.size)
        speed, optimizer_s, probe_s = size.tokens_per_s, size.optimizer_s, size.probe_seconds
        choices["model_size"] = {"chosen": size.size, "why": size.reason}
    budget = budget_s is not None or max_tokens is not None
    tokens = math.inf
    if budget and (cfg.batch_size is None or cfg.learning_rate is None):
        if budget_s is not None and speed is None:
            t = time.perf_counter()  # the probe's own cost comes out of the budget
            probe = (cfg.model_size, vocab_size, context, eos_token_id, precision, cfg.loss_chunk_tokens)
            speed = world * measure_tokens_per_s(*probe, tie_embeddings=cfg.tie_embeddings, optimizer=optimizer)
            optimizer_s = measure_optimizer_step_s(*probe, tie_embeddings=cfg.tie_embeddings, optimizer=optimizer)
            probe_s += time.perf_counter() - t
        if budget_s is not None and speed:  # a step costs its tokens and the optimizer's fixed seconds
            cost = StepCost(speed, optimizer_s)
        tokens = speed * max(0.0, budget_s - probe_s) if budget_s is not None and speed else math.inf
        tokens = min(tokens, max_tokens or math.inf)
        check(budget_s is None or tokens >= context, f"--max-time {cfg.max_time}: measuring this machine's speed "
              f"took {probe_s:.1f} s of it, which leaves no time to train; give a longer --max-time, or --batch-size "
              "and --learning-rate (with a --model-size) so that nothing is measured")
    if cfg.batch_size is None:
        if not budget:
            cfg = replace(cfg, batch_size=DEFAULT_BATCH, gradient_accumulation_steps=cfg.gradient_accumulation_steps
                          or 1)
        else:
            batch = (choose_batch_in_time(train_flops(cfg.model_size, vocab_size, context, 1.0),
                                          max(0.0, budget_s - probe_s), cost, max_tokens, context, world,
                                          cfg.gradient_accumulation_steps) if cost is not None else
                     choose_batch(train_flops(cfg.model_size, vocab_size, context, tokens), tokens, context, world,
                                  cfg.gradient_accumulation_steps))
            cfg = replace(cfg, batch_size=batch.batch_size, gradient_accumulation_steps=batch.accumulation)
            choices["batch"] = {"batch_size": batch.batch_size, "gradient_accumulation_steps": batch.accumulation,
                                "why": batch.reason}
            if batch.optimizer_share is not None:
                choices["batch"]["optimizer_share"] = round(batch.optimizer_share, 3)
    elif cfg.gradient_accumulation_steps is None:
        cfg = replace(cfg, gradient_accumulation_steps=1)
    if cfg.learning_rate is None and budget:
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world * context
        if cost is not None:  # the tokens the time holds at this step
            tokens = min(cost.tokens_in(max(0.0, budget_s - probe_s), per_step), max_tokens or math.inf)
        if cfg.max_steps:  # a --max-steps below the budget ends the run first
            tokens = min(tokens, cfg.max_steps * per_step)
        lr = choose_learning_rate(train_flops(cfg.model_size, vocab_size, context, tokens), per_step,
                                  muon=resolve_optimizer(cfg.optimizer, cfg.fsdp)[0] == "muon")
        cfg = replace(cfg, learning_rate=lr.learning_rate)
        choices["learning_rate"] = {"chosen": lr.learning_rate, "why": lr.reason}
    if speed is not None:
        choices["measured_tokens_per_s"] = round(speed, 1)  # forward + backward
        choices["measured_optimizer_seconds"] = round(optimizer_s, 4)  # per step, the run's optimizer
    if probe_s:
        choices["measuring_seconds"] = round(probe_s, 2)  # taken from the --max-time budget
    if choices and world > 1:
        cfg, choices = _rank_zeros_choice(cfg, choices)
    if choices and is_main_process() and not cfg.quiet:
        _say_choices(cfg, choices)
    return cfg, choices


def _say_choices(cfg: TrainConfig, choices: dict[str, Any]) -> None:
    """Each budget choice in one line with its reason, as run_config.json's chosen_for_budget records it."""
    for what, label in (("model_size", "--model-size auto"), ("batch", "batch"), ("learning_rate", "learning rate")):
        if what in choices:
            chosen = (f"{cfg.batch_size} chunks x {cfg.gradient_accumulation_steps} micro-batches per step"
                      if what == "batch" else f"{choices[what]['chosen']:.3g}" if what == "learning_rate"
                      else choices[what]["chosen"])
            print(f"{label}: {chosen} ({choices[what]['why']}; explicit flags win)", file=sys.stderr)


def _rank_zeros_choice(cfg: TrainConfig, choices: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """Each rank measured its own speed: near a rounding edge they could choose differently, and ranks with
    different shapes or batches would hang in the first all-reduce. Rank 0's choice holds for all."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    PartialState(cpu=not torch.cuda.is_available())  # joins the process group (as run.new_run_dir does)
    decided = [(cfg.model_size, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.learning_rate, choices)]
    broadcast_object_list(decided)
    size, batch_size, accumulation, lr, choices = decided[0]
    return replace(cfg, model_size=size, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                   learning_rate=lr), choices


# ------------------------------------------------------------------------------------------ --resume

def choices_of_resumed_run(cfg: TrainConfig, saved: dict[str, Any]) -> TrainConfig:
    """The settings a resumed run keeps from its record where the command leaves them open; a flag that
    contradicts what the checkpoint's optimizer state holds is refused."""
    changes: dict[str, Any] = {}
    if cfg.model_size == "auto":
        changes["model_size"] = saved["model_size"]
    if cfg.learning_rate is None and saved.get("learning_rate"):  # the rate the run trained with: chosen for its
        changes["learning_rate"] = saved["learning_rate"]  # budget, or its size's
    # the scale decides the optimizer's param groups: checkpoints of another one do not load
    recorded_scale = saved.get("embedding_lr_scale") or 1.0  # runs from before the option had none
    if cfg.embedding_lr_scale is None:
        changes["embedding_lr_scale"] = recorded_scale
    elif cfg.embedding_lr_scale != recorded_scale:
        raise UsageError(f"cannot resume: the run was trained with --embedding-lr-scale {recorded_scale:g} (pass "
                         "that, or leave the flag out)")
    # optimizer.pt's param groups carry the betas the run trained with, and loading it restores them: another
    # value would be silently ignored. Runs from before the options had torch's (0.9, 0.95)
    for name, old_default in (("adam_beta1", 0.9), ("adam_beta2", 0.95)):
        recorded = saved[name] if saved.get(name) is not None else old_default
        if getattr(cfg, name) is None:
            changes[name] = recorded
        elif getattr(cfg, name) != recorded:
            raise UsageError(f"cannot resume: the run was trained with --{name.replace('_', '-')} {recorded:g} "
                             "(pass that, or leave the flag out)")
    # the same for the decay of AdamW's matrices beside Muon: runs from before the option decayed them by
    # --weight-decay (adamw runs record none: --weight-decay is all there is; asking to resume a Muon run with
    # adamw is refused by check_resumable, with its own message)
    if all(resolve_optimizer(kind, fsdp)[0] == "muon" for kind, fsdp in (
            (saved.get("optimizer", "adamw"), bool(saved.get("fsdp"))), (cfg.optimizer, cfg.fsdp))):
        recorded = saved.get("adamw_weight_decay", saved.get("weight_decay", 0.1))
        if cfg.adamw_weight_decay is None:
            changes["adamw_weight_decay"] = recorded
        elif cfg.adamw_weight_decay != recorded:
            raise UsageError(f"cannot resume: the run was trained with --adamw-weight-decay {recorded:g} (pass "
                             "that, or leave the flag out)")
    if cfg.batch_size is None:
        changes["batch_size"] = saved["batch_size"]
        changes["gradient_accumulation_steps"] = saved["gradient_accumulation_steps"]
    elif cfg.gradient_accumulation_steps is None:
        changes["gradient_accumulation_steps"] = 1
    return replace(cfg, **changes) if changes else cfg


def resolve_resume(cfg: TrainConfig, output_dir: Path) -> ResumePoint | None:
    """What --resume continues: the run, the checkpoint to load, the run's length. None: start a new run."""
    spec = cfg.resume
    assert spec is not None
    if spec in ("latest", "auto"):
        # --model-size auto: the newest unfinished run of any size (the one this command started before)
        sizes = list(MODEL_PRESETS) if cfg.model_size == "auto" else [cfg.model_size]
        unfinished = [r for r in (newest_unfinished_run(output_dir, s) for s in sizes) if r is not None]
        run_dir = max(unfinished, key=lambda r: str(read_run_config(r).get("started_at", ""))) if unfinished else None
        if run_dir is None:
            if spec == "auto":
                return None
            latest = [latest_link(output_dir, s) for s in sizes if latest_link(output_dir, s).exists()]
            if latest:
                raise UsageError(_finished_advice(latest[0].resolve(), cfg))
            raise UsageError(f"cannot resume: no unfinished {cfg.model_size} run in {output_dir}; start one "
                             "without --resume (or pass a run directory)")
        checkpoint = None
    else:
        path = Path(spec)
        if not path.exists():
            raise UsageError(f"cannot resume: {path} does not exist")
        path = path.resolve()
        if (path / "trainer_state.json").is_file():  # an explicit checkpoint: used as given, never swapped
            checkpoint, run_dir = path, path.parent.parent
            problem = checkpoint_problem(checkpoint)
            if problem:
                raise UsageError(f"cannot resume from {checkpoint}: {problem}; pass the run directory to use its "
                                 "newest intact checkpoint")
        elif (path / "checkpoints").is_dir():
            checkpoint, run_dir = None, path
        else:
            raise UsageError(f"cannot resume: {path} is neither a run directory (with checkpoints/) nor a "
                             "checkpoint (with trainer_state.json)")
    saved = read_run_config(run_dir)
    if checkpoint is None:
        checkpoint = usable_checkpoint(run_dir)
        if checkpoint is None:
            raise UsageError(f"cannot resume: {run_dir} holds no intact checkpoint; start a new run")
    total = int(saved.get("total_steps") or 0) or checkpoint_step(checkpoint)
    if run_status(run_dir) != FINISHED:
        return ResumePoint(run_dir, checkpoint, total, None)
    reached = max(total, checkpoint_step(checkpoint))
    if not cfg.max_steps or cfg.max_steps <= reached:
        raise UsageError(_finished_advice(run_dir, cfg, reached))
    return ResumePoint(run_dir, checkpoint, cfg.max_steps, reached)


def _finished_advice(run_dir: Path, cfg: TrainConfig, reached: int | None = None) -> str:
    reached = reached or int(read_run_config(run_dir).get("total_steps") or 0)
    return (f"{run_dir} is finished (step {reached}) and is never changed by --resume alone; to train it further "
            f"pass --resume {run_dir} --max-steps N with N > {reached}, or start a new run from its weights with "
            f"--init-from {run_dir}")


def check_resumable(checkpoint: Path, cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    saved_model = read_json(checkpoint / "config.json", advice="pass an earlier checkpoint with --resume")
    p = preset(cfg.model_size)
    problems = []
    if saved_model.get("vocab_size") != manifest["vocab_size"]:
        problems.append(f"vocabulary {saved_model.get('vocab_size')} vs the dataset's {manifest['vocab_size']}")
    if saved_model.get("n_positions") != manifest["chunk_size"]:
        problems.append(f"context {saved_model.get('n_positions')} vs the dataset's chunk size "
                        f"{manifest['chunk_size']}")
    if (saved_model.get("n_layer"), saved_model.get("n_embd")) != (p.n_layer, p.n_embd):
        problems.append(f"shape {saved_model.get('n_layer')}x{saved_model.get('n_embd')} is not --model-size "
                        f"{cfg.model_size}")
    # optimizer.pt holds one optimizer's state: another one cannot load it (and would fail with a traceback)
    ran = read_run_config(checkpoint.parent.parent)
    was = resolve_optimizer(ran.get("optimizer", "adamw"), bool(ran.get("fsdp")))[0]
    if was != resolve_optimizer(cfg.optimizer, cfg.fsdp)[0]:
        problems.append(f"it was trained with --optimizer {was} (pass --optimizer {was})")
    # the schedule is rebuilt from the settings: another one would change the learning rate mid-run (runs from
    # before wsd became the default recorded cosine)
    schedule = ran.get("schedule", "cosine")
    if schedule != cfg.schedule:
        problems.append(f"it was trained with --schedule {schedule} (pass --schedule {schedule})")
    problems += resume_conflicts(cfg, ran)  # the optimizer options its state was built with
    if problems:
        raise UsageError(f"cannot resume from {checkpoint}: " + "; ".join(problems))
    _check_unpicklable(checkpoint)


def _check_unpicklable(checkpoint: Path) -> None:
    """The optimizer's and scheduler's states load as the Trainer will load them (torch.load, weights_only), before
    the run's record is touched: a file holding other objects is refused in one line. mmap: tensors are not read."""
    import pickle

    import torch

    for name in ("optimizer.pt", "scheduler.pt"):
        path = checkpoint / name
        if path.is_file():
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (pickle.UnpicklingError, RuntimeError, ValueError) as e:
                raise UsageError(f"cannot resume from {checkpoint}: {name} holds objects that are never unpickled "
                                 f"or is damaged ({first_line(e, 160)}); pass an earlier checkpoint with --resume, or "
                                 "start a new run") from None


# ------------------------------------------------------------------------------------------ --init-from, trackers

def check_init_source(cfg: TrainConfig, model_config: Any) -> Path | None:
    """The directory --init-from loads, checked before anything is written: safetensors, the same shapes."""
    if not cfg.init_from:
        return None
    source = Path(cfg.init_from)
    if (source / "final_model" / "config.json").is_file():
        source = source / "final_model"
    check((source / "config.json").is_file(), f"--init-from {cfg.init_from}: not a model, run or checkpoint "
          "directory (no config.json)")
    check((source / "model.safetensors").is_file(), f"--init-from {source}: no model.safetensors (pickled "
          "weights are never loaded)")
    saved = read_json(source / "config.json", f"--init-from {source / 'config.json'}")
    check(isinstance(saved, dict), f"--init-from {source}: config.json is not a mapping")
    mine = model_config.to_dict()
    diffs = [f"{k} {saved.get(k)} vs {mine[k]}" for k in ("vocab_size", "n_positions", "n_layer", "n_embd", "n_head")
             if saved.get(k) != mine[k]]
    check(not diffs, f"--init-from {source} does not fit this run ({', '.join(diffs)}): use the same "
          "--model-size and a dataset made with the same tokenizer and --chunk-size")
    return source


def saved_tie_embeddings(model_dir: Path) -> bool:
    """Whether the model saved in `model_dir` ties its LM head to the token embedding (transformers' default, and
    GPT-2's, when config.json does not say)."""
    saved = read_json(model_dir / "config.json")
    return bool(saved.get("tie_word_embeddings", True)) if isinstance(saved, dict) else True


def check_tracker(report_to: str) -> None:
    if report_to == "none":
        return
    module = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}[report_to]
    if importlib.util.find_spec(module) is None and not (
            report_to == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        raise UsageError(f"--report-to {report_to}: {module} is not installed; `pip install {module}` or use "
                         "--report-to none")
    if report_to == "wandb" and not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in
                                     ("offline", "disabled") or (Path.home() / ".netrc").is_file()):
        raise UsageError("--report-to wandb: not logged in; run `wandb login`, set WANDB_API_KEY, or set "
                         "WANDB_MODE=offline")
