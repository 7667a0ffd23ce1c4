"""`train(cfg)`: one training run from start (or resume) to a published final_model; see the package docstring."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2_dutch.core.devices import is_main_process, resolve_precision, world_size
from gpt2_dutch.core.errors import MachineError, Stopped, UsageError, check, is_disk_full
from gpt2_dutch.core.files import replace_dir, temp_name, write_json_atomic
from gpt2_dutch.data.chunks import load_split, read_manifest
from gpt2_dutch.model.presets import MODEL_PRESETS, flops_per_token, gpt2_config, matmul_params, preset
from gpt2_dutch.push import check_ready_to_push, push_after_training
from gpt2_dutch.runs.card import describe_hardware, write_card
from gpt2_dutch.runs.records import (
    FINISHED,
    checkpoint_problem,
    checkpoint_step,
    create_run_dir,
    keep_metrics_up_to,
    latest_link,
    newest_unfinished_run,
    read_run_config,
    run_status,
    update_latest_link,
    update_run_config,
    usable_checkpoint,
)
from gpt2_dutch.train.config import ADAM_BETAS, EMBEDDING_LR_SCALE, MUON_ADAMW_WEIGHT_DECAY, TrainConfig
from gpt2_dutch.train.muon import MUON_LR, resolve_optimizer
from gpt2_dutch.train.schedule import make_schedule, warmup_steps_for

MAX_CONTEXT = 16384  # dense attention beyond this needs more memory than any preset is sized for
PROVISIONAL_STEPS = 100  # the run length a --max-time run warms up for until its speed is measured
UNFITTED = 10**9  # the step count of a --max-time run until its speed is measured (an upper bound)
# An evaluation chunk costs about a third of a training chunk (forward only): scoring 3% of the run's training
# chunks at each of its ten evaluations costs about 10% of the training time (docs/experiments/budget.md).
EVAL_SHARE, EVAL_CHUNKS_MIN, EVAL_CHUNKS_MAX = 0.03, 16, 1000
_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")  # a directory the user chose wins


def maybe_relaunch_on_all_gpus() -> None:
    """With several GPUs and no launcher, re-run this very command under torchrun: one process per GPU (DDP),
    never the slow single-process nn.DataParallel fallback."""
    n = torch.cuda.device_count()
    if n <= 1 or "LOCAL_RANK" in os.environ:
        return
    print(f"{n} GPUs found: relaunching with torchrun --nproc_per_node {n} (DDP)", file=sys.stderr)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           *sys.orig_argv[1:]]
    raise SystemExit(subprocess.call(cmd))


# ------------------------------------------------------------------------------------------ training

def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows]).astype(np.int64))
    return {"input_ids": ids, "labels": ids}  # the model shifts labels itself; every token is a target


def train(cfg: TrainConfig) -> Path:
    """Run training; return the run directory."""
    maybe_relaunch_on_all_gpus()
    manifest = read_manifest(cfg.dataset_path)  # type: ignore[arg-type]
    if cfg.push_to_hub:
        check_ready_to_push(cfg.push_to_hub)  # a missing login fails now, not after hours of training
    from gpt2_dutch.train.trainer import transformers_bars_off

    try:
        with transformers_bars_off():
            return _run(cfg, manifest)
    except torch.OutOfMemoryError:
        raise UsageError(_OOM_ADVICE) from None
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            raise UsageError(_OOM_ADVICE) from None
        raise


_OOM_ADVICE = ("out of memory: lower --batch-size (raise --gradient-accumulation-steps to keep the tokens per "
               "step), add --gradient-checkpointing, use --precision bf16, or pick a smaller --model-size")


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


def _choose_for_budget(cfg: TrainConfig, vocab_size: int, context: int, eos_token_id: int,
                       precision: str) -> tuple[TrainConfig, dict[str, Any]]:
    """Resolve --model-size auto, and a --batch-size and --learning-rate left open (budget.py); what was chosen
    and why."""
    from gpt2_dutch.train.budget import (
        DEFAULT_BATCH,
        choose_batch,
        choose_learning_rate,
        choose_model_size,
        measure_tokens_per_s,
        train_flops,
    )

    choices: dict[str, Any] = {}
    budget_s, max_tokens, world = cfg.max_time_s, cfg.max_tokens, world_size()
    speed = None
    probe_s = 0.0
    if cfg.model_size == "auto":
        size = choose_model_size(vocab_size, context, eos_token_id, precision, max_tokens, budget_s,
                                 cfg.loss_chunk_tokens, world, cfg.tie_embeddings)
        cfg = replace(cfg, model_size=size.size)
        speed, probe_s = size.tokens_per_s, size.probe_seconds
        choices["model_size"] = {"chosen": size.size, "why": size.reason}
    budget = budget_s is not None or max_tokens is not None
    tokens = math.inf
    if budget and (cfg.batch_size is None or cfg.learning_rate is None):
        if budget_s is not None and speed is None:
            t = time.perf_counter()
            speed = world * measure_tokens_per_s(cfg.model_size, vocab_size, context, eos_token_id, precision,
                                                 cfg.loss_chunk_tokens, tie_embeddings=cfg.tie_embeddings)
            probe_s += time.perf_counter() - t
        tokens = speed * max(0.0, budget_s - probe_s) if budget_s is not None and speed else math.inf
        tokens = min(tokens, max_tokens or math.inf)
    if cfg.batch_size is None:
        if not budget:
            cfg = replace(cfg, batch_size=DEFAULT_BATCH, gradient_accumulation_steps=cfg.gradient_accumulation_steps
                          or 1)
        else:
            batch = choose_batch(train_flops(cfg.model_size, vocab_size, context, tokens), tokens, context, world,
                                 cfg.gradient_accumulation_steps)
            cfg = replace(cfg, batch_size=batch.batch_size, gradient_accumulation_steps=batch.accumulation)
            choices["batch"] = {"batch_size": batch.batch_size, "gradient_accumulation_steps": batch.accumulation,
                                "why": batch.reason}
    elif cfg.gradient_accumulation_steps is None:
        cfg = replace(cfg, gradient_accumulation_steps=1)
    if cfg.learning_rate is None and budget:
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world * context
        if cfg.max_steps:  # a --max-steps below the budget ends the run first
            tokens = min(tokens, cfg.max_steps * per_step)
        lr = choose_learning_rate(train_flops(cfg.model_size, vocab_size, context, tokens), per_step,
                                  muon=resolve_optimizer(cfg.optimizer, cfg.fsdp)[0] == "muon")
        cfg = replace(cfg, learning_rate=lr.learning_rate)
        choices["learning_rate"] = {"chosen": lr.learning_rate, "why": lr.reason}
    if speed is not None:
        choices["measured_tokens_per_s"] = round(speed, 1)
    if probe_s:
        choices["measuring_seconds"] = round(probe_s, 2)  # taken from the --max-time budget
    if choices and world > 1:
        # each rank measured its own speed: near a rounding edge they could choose differently, and ranks with
        # different shapes or batches would hang in the first all-reduce. Rank 0's choice holds for all.
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list

        PartialState(cpu=not torch.cuda.is_available())  # joins the process group (as _new_run_dir does)
        decided = [(cfg.model_size, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.learning_rate, choices)]
        broadcast_object_list(decided)
        size, batch_size, accumulation, lr, choices = decided[0]
        cfg = replace(cfg, model_size=size, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                      learning_rate=lr)
    if choices and is_main_process() and not cfg.quiet:
        for what, label in (("model_size", "--model-size auto"), ("batch", "batch"),
                            ("learning_rate", "learning rate")):
            if what in choices:
                chosen = (f"{cfg.batch_size} chunks x {cfg.gradient_accumulation_steps} micro-batches per step"
                          if what == "batch" else f"{choices[what]['chosen']:.3g}" if what == "learning_rate"
                          else choices[what]["chosen"])
                print(f"{label}: {chosen} ({choices[what]['why']}; explicit flags win)", file=sys.stderr)
    return cfg, choices


def _choices_of_resumed_run(cfg: TrainConfig, saved: dict[str, Any]) -> TrainConfig:
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
    # adamw is refused by _check_resumable, with its own message)
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


def run_config_dict(cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    """The run's settings (every TrainConfig field) and `extra` run information, marked as a run's record so
    that `train --config run_config.json` replays the settings (see gpt2_dutch.core.options)."""
    d = {"format": TrainConfig.RECORD_FORMAT, **asdict(cfg)}
    d.update(extra)
    return d


@dataclass
class ResumePoint:
    run_dir: Path
    checkpoint: Path
    total_steps: int
    extended_from: int | None  # the step a finished run had reached, when --max-steps extends it


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


def _new_run_dir(cfg: TrainConfig, output_dir: Path) -> Path:
    """Rank 0 creates the run directory (a name no other run has) and tells the other ranks which it is."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    # joins the process group under torchrun, so ranks agree on one run name; cpu=True as TrainingArguments(use_cpu)
    # says it, or on CPU the state would be made single-process first and every rank would train alone
    state = PartialState(cpu=not torch.cuda.is_available())
    name = [""]
    if state.is_main_process:
        name[0] = create_run_dir(output_dir, cfg.model_size).name
    if state.num_processes > 1:
        broadcast_object_list(name)
    return output_dir / name[0]


def _init_source(cfg: TrainConfig, model_config: Any) -> Path | None:
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
    try:
        saved = json.loads((source / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--init-from {source}: config.json is damaged ({e})") from None
    mine = model_config.to_dict()
    diffs = [f"{k} {saved.get(k)} vs {mine[k]}" for k in ("vocab_size", "n_positions", "n_layer", "n_embd", "n_head")
             if saved.get(k) != mine[k]]
    check(not diffs, f"--init-from {source} does not fit this run ({', '.join(diffs)}): use the same "
          "--model-size and a dataset made with the same tokenizer and --chunk-size")
    return source


def _saved_tie_embeddings(model_dir: Path) -> bool:
    """Whether the model saved in `model_dir` ties its LM head to the token embedding (transformers' default, and
    GPT-2's, when config.json does not say)."""
    try:
        return bool(json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", True))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {model_dir / 'config.json'} ({e})") from None


def _initial_model(model_config: Any, source: Path | None) -> Any:
    """Random weights, or those of the checked --init-from model."""
    from transformers import AutoModelForCausalLM

    if source is None:
        return AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa")
    try:
        return AutoModelForCausalLM.from_pretrained(str(source), config=model_config, use_safetensors=True,
                                                    attn_implementation="sdpa")
    except Exception as e:  # noqa: BLE001 - a damaged file: one line
        raise UsageError(f"--init-from {source}: cannot load its weights ({str(e).splitlines()[0][:160]})") from None


def _run(cfg: TrainConfig, manifest: dict[str, Any]) -> Path:
    from transformers import AutoTokenizer, set_seed

    dataset_path = Path(cfg.dataset_path)  # type: ignore[arg-type]
    context, vocab_size = int(manifest["chunk_size"]), int(manifest["vocab_size"])
    check(context <= MAX_CONTEXT, f"the dataset's chunks are {context} tokens, longer than the {MAX_CONTEXT} "
          "this trainer allows; preprocess with a smaller --chunk-size (GPT-2 uses 1024)")
    train_ds, test_ds = load_split(dataset_path, "train"), load_split(dataset_path, "test")
    tokenizer = AutoTokenizer.from_pretrained(str(dataset_path))
    precision = resolve_precision(cfg.precision)
    _check_tracker(cfg.report_to)
    output_dir = Path(cfg.output_dir)
    resume = resolve_resume(cfg, output_dir) if cfg.resume else None
    # --model-size auto and a batch left to the budget: a resumed run keeps what it chose (the same shape, and
    # the same batches so that its data position still means the same chunks); a new run chooses now, before
    # any seeded work, since measuring its speed builds models
    if resume is not None:
        cfg, budget_choices = _choices_of_resumed_run(cfg, read_run_config(resume.run_dir)), {}
    else:
        cfg, budget_choices = _choose_for_budget(cfg, vocab_size, context, tokenizer.eos_token_id, precision)
        if cfg.embedding_lr_scale is None:
            cfg = replace(cfg, embedding_lr_scale=EMBEDDING_LR_SCALE)
        kind = resolve_optimizer(cfg.optimizer, cfg.fsdp)[0]
        beta1, beta2 = ADAM_BETAS[kind]
        cfg = replace(cfg, adam_beta1=beta1 if cfg.adam_beta1 is None else cfg.adam_beta1,
                      adam_beta2=beta2 if cfg.adam_beta2 is None else cfg.adam_beta2)
        if kind == "muon" and cfg.adamw_weight_decay is None:
            cfg = replace(cfg, adamw_weight_decay=MUON_ADAMW_WEIGHT_DECAY)
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size() * context
    total_steps, limit = plan_steps(cfg, len(train_ds), tokens_per_step)

    model_config = gpt2_config(cfg.model_size, vocab_size, context, tokenizer.eos_token_id, cfg.tie_embeddings)
    init_source = _init_source(cfg, model_config)
    # a checkpoint or --init-from model keeps its own head: untying a tied one would leave lm_head random
    # (from_pretrained only warns), and tying an untied one would drop its trained head
    kept_from = resume.checkpoint if resume is not None else init_source
    if kept_from is not None:
        model_config.tie_word_embeddings = _saved_tie_embeddings(kept_from)
        cfg = replace(cfg, tie_embeddings=model_config.tie_word_embeddings)
    if resume is not None:
        run_dir, checkpoint, total_steps = resume.run_dir, resume.checkpoint, resume.total_steps
        _check_resumable(checkpoint, cfg, manifest)
        if resume.extended_from is not None:
            limit = "max_steps"
    else:
        run_dir, checkpoint = _new_run_dir(cfg, output_dir), None

    set_seed(cfg.seed)
    model = _initial_model(model_config, init_source)
    lr = cfg.learning_rate or preset(cfg.model_size).learning_rate
    optimizer, optimizer_notice = resolve_optimizer(cfg.optimizer, cfg.fsdp)
    # A --max-time run knows its length only after its first steps (total_steps is a 10**9 upper bound until
    # then): a warmup of 5% of that bound would train those steps at ~1e-10 of the peak. Until the fit, warm up
    # as a 100-step run would; the fit then sets the real warmup (the schedule is a pure function of the step).
    provisional = PROVISIONAL_STEPS if total_steps >= UNFITTED else total_steps
    schedule = make_schedule(cfg.schedule, total_steps, warmup_steps_for(cfg.warmup, provisional), cfg.cooldown)
    # An unfitted --max-time run sets these once its length is known; a resumed one knows it already.
    auto_every = max(1, total_steps // 10) if total_steps < UNFITTED else UNFITTED
    eval_every = cfg.eval_every or auto_every
    save_every = cfg.save_every or auto_every
    log_every = cfg.log_every or (max(1, total_steps // 100) if total_steps < UNFITTED else 10)
    chunks_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size()
    # an unfitted --max-time run chooses it at the fit (MaxTimeCallback), when its length is known
    eval_chunks = cfg.eval_chunks if cfg.eval_chunks is not None else auto_eval_chunks(total_steps, chunks_per_step)
    run_info = {
        "model_size": cfg.model_size, "dataset_path": str(dataset_path.resolve()), "precision": precision,
        "learning_rate": lr, "total_steps": total_steps, "length_set_by": limit,
        "tokens_per_step": tokens_per_step, "world_size": world_size(), "context": context,
        "eval_chunks_per_evaluation": eval_chunks,
        "vocab_size": vocab_size, "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token(matmul_params(model), model_config.n_layer, model_config.n_embd, context),
        **({"muon_lr": MUON_LR} if optimizer == "muon" else {}),
        **({"chosen_for_budget": budget_choices} if budget_choices else {}),
    }
    if is_main_process():
        if resume is None:
            write_json_atomic(run_dir / "run_config.json", run_config_dict(
                cfg, **run_info, status="running",
                started_at=datetime.now().isoformat(timespec="microseconds")))
        else:
            keep_metrics_up_to(run_dir, checkpoint_step(checkpoint))
            changes: dict[str, Any] = {"status": "running"}
            if resume.extended_from is not None:  # say in the run's own record how far and from where it grew
                extensions = read_run_config(run_dir).get("extensions", [])
                changes.update(total_steps=total_steps, max_steps=total_steps, length_set_by="max_steps",
                               extensions=[*extensions, {"from_step": resume.extended_from, "to_step": total_steps}])
            update_run_config(run_dir, **changes)
    if cfg.report_to == "tensorboard" and not _USER_TENSORBOARD_DIR:
        # The Trainer would log under checkpoints/runs/<date>; keep the run's event files beside its metrics.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")

    from gpt2_dutch.train.trainer import (
        GPT2Trainer,
        MaxTimeCallback,
        StepHealth,
        StopOnSignal,
        build_training_arguments,
        install_console,
        metrics_callbacks,
        weights_finite,
    )

    # the seconds spent measuring speed for the budget's choices are part of the budget
    budget_s = cfg.max_time_s and max(1.0, cfg.max_time_s - budget_choices.get("measuring_seconds", 0.0))
    args = build_training_arguments(cfg, run_dir, precision, lr, total_steps, eval_every, save_every, log_every)
    health, stopper = StepHealth(sync=cfg.fsdp), StopOnSignal()
    if optimizer_notice and is_main_process():
        print(optimizer_notice, file=sys.stderr)
    trainer = GPT2Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=test_ds, data_collator=collate,
        callbacks=[health, stopper, *metrics_callbacks(cfg, run_dir, run_info, manifest, schedule, budget_s,
                                                       auto_eval=cfg.eval_every is None,
                                                       auto_save=cfg.save_every is None)],
        schedule=schedule, keep_checkpoints=cfg.keep_checkpoints, tokens_per_step=tokens_per_step,
        bytes_per_token=_bytes_per_token(manifest), health=health, optimizer_kind=optimizer,
        loss_chunk_tokens=cfg.loss_chunk_tokens, eval_chunks=eval_chunks, embedding_lr_scale=cfg.embedding_lr_scale,
        adamw_weight_decay=cfg.adamw_weight_decay,
    )
    fitting = next((c for c in trainer.callback_handler.callbacks if isinstance(c, MaxTimeCallback)), None)
    if fitting is not None and cfg.eval_chunks is None:
        def _refit_eval_chunks(total: int) -> None:
            trainer.eval_chunks = auto_eval_chunks(total, chunks_per_step)
            if is_main_process():
                update_run_config(run_dir, eval_chunks_per_evaluation=trainer.eval_chunks)

        fitting.fit_listeners.append(_refit_eval_chunks)
    # rank 0 prints; --quiet wins over --log-format (a script that asks for silence gets silence)
    console = install_console(trainer, "quiet" if cfg.quiet or not is_main_process() else cfg.log_format)
    what = f"a {cfg.max_time} budget" if limit == "max_time" else f"{total_steps} steps"
    if checkpoint is not None:
        what += f", resuming at step {checkpoint_step(checkpoint)} from {checkpoint}"
    if not cfg.quiet and is_main_process():
        print(f"training {cfg.model_size} ({run_info['parameters'] / 1e6:.1f}M parameters) on {dataset_path} for "
              f"{what} ({tokens_per_step:,} tokens/step, {precision}) -> {run_dir}", file=sys.stderr)
    with _disk_full_is_one_line(run_dir, trainer), stopper.installed():
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            if stopper.signal is None and not health.diverged:
                evals = [r for r in trainer.state.log_history if "eval_loss" in r]
                if not evals or evals[-1].get("step") != trainer.state.global_step:
                    trainer.evaluate()  # always end with an evaluation of the final weights
        finally:
            console.close()  # before any error line: a bar left open would redraw itself below it
    step = trainer.state.global_step
    if stopper.signal is not None:
        _set_status(run_dir, "stopped")
        name = stopper.signal_name
        raise Stopped(f"stopped by {name} at step {step}; checkpoint saved in {run_dir / 'checkpoints'}; continue "
                      f"with the same command and --resume {run_dir} (or a bare --resume)", 128 + stopper.signal)
    if health.diverged:
        _set_status(run_dir, "diverged")
        kept = usable_checkpoint(run_dir)
        raise UsageError(f"training diverged: {health.in_a_row} steps in a row had a non-finite loss or gradient "
                         f"(from step {health.first_bad_of_streak}); nothing was published" +
                         (f", the last good checkpoint is {kept}" if kept else " and no checkpoint was written") +
                         f"; lower --learning-rate (it was {lr:g}) or use --precision fp32, and start again")
    finite = weights_finite(trainer.model, sync=cfg.fsdp)
    if health.applied == 0 and checkpoint is None or not finite:
        _set_status(run_dir, "failed")
        why = ("no optimizer step was applied" if finite
               else "the weights are not finite")
        raise UsageError(f"the run ended but {why}; nothing was published as final_model; lower --learning-rate "
                         "or check the data")
    if is_main_process():
        with _disk_full_is_one_line(run_dir, trainer):
            _save_final_model(trainer, tokenizer, run_dir)
        _set_status(run_dir, FINISHED)
        update_latest_link(run_dir, cfg.model_size)
        print(f"final model: {run_dir / 'final_model'}  (loss curve: {run_dir / 'loss.png'})", file=sys.stderr)
        if cfg.push_to_hub:
            push_after_training(run_dir, cfg.push_to_hub, cfg.private)
    return run_dir


@contextlib.contextmanager
def _disk_full_is_one_line(run_dir: Path, trainer: Any) -> Iterator[None]:
    """A full disk while checkpointing or saving (torch.save reports it as a RuntimeError): one line, exit 1.
    Checkpoints and final_model are written under temporary names, so what is left is complete."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not (is_disk_full(e) or "file write failed" in str(e)):
            raise
        with contextlib.suppress(OSError):
            _set_status(run_dir, "failed")
        raise MachineError(f"no space left on the device while writing {run_dir} (step "
                           f"{trainer.state.global_step}); its complete checkpoints are kept: free some space and "
                           f"continue with --resume {run_dir}") from None


def _set_status(run_dir: Path, status: str) -> None:
    if is_main_process():
        update_run_config(run_dir, status=status)


def _bytes_per_token(manifest: dict[str, Any]) -> float:
    test = manifest["splits"]["test"]
    return test["bytes"] / test["tokens"]


def _check_tracker(report_to: str) -> None:
    import importlib.util

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


def _check_resumable(checkpoint: Path, cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    saved_model = json.loads((checkpoint / "config.json").read_text())
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
    if problems:
        raise UsageError(f"cannot resume from {checkpoint}: " + "; ".join(problems))


def _save_final_model(trainer: Any, tokenizer: Any, run_dir: Path) -> None:
    from transformers import GenerationConfig

    final, tmp = run_dir / "final_model", temp_name(run_dir / "final_model")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the run's settings are in run_config.json
        tokenizer.save_pretrained(str(tmp))
        eos = tokenizer.eos_token_id
        GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=True, top_k=50,
                         top_p=0.95, temperature=0.8, max_new_tokens=100).save_pretrained(str(tmp))
        write_card(tmp, run_dir, hardware=describe_hardware())  # README.md and loss.png, inside the staging dir
        replace_dir(tmp, final)  # an extended run's previous final_model stays until the new one is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
