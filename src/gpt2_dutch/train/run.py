"""`train(cfg)`: one training run, from start or resume to a published final_model: plan -> build -> fit ->
publish. The plan (plan.py) decides every setting; this file only carries it out. See the package docstring."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2_dutch.core.devices import is_main_process, world_size
from gpt2_dutch.core.errors import MachineError, Stopped, UsageError, first_line, is_disk_full
from gpt2_dutch.core.files import replace_dir, temp_name
from gpt2_dutch.core.ownership import DirectoryOwner, remove_dead_staging
from gpt2_dutch.data.chunks import load_split, read_manifest
from gpt2_dutch.data.tokenizer import BadTokenizer, load_tokenizer_dir
from gpt2_dutch.model.presets import flops_per_token, matmul_params
from gpt2_dutch.push import check_ready_to_push, push_after_training
from gpt2_dutch.runs.card import describe_hardware, write_card
from gpt2_dutch.runs.records import (
    FINISHED,
    checkpoint_step,
    create_run_dir,
    keep_metrics_up_to,
    read_run_config,
    update_latest_link,
    update_run_config,
    usable_checkpoint,
    write_run_config,
)
from gpt2_dutch.train.config import TrainConfig
from gpt2_dutch.train.muon import MUON_LR
from gpt2_dutch.train.plan import TrainPlan, auto_eval_chunks, make_plan
from gpt2_dutch.train.schedule import make_schedule

RUN_LOCK = ".lock"  # inside the run directory, while a process trains it
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


def refuse_a_restart_on_a_stale_store() -> None:
    """A worker group that torchrun restarted (--max-restarts) on the agent's shared TCPStore can read the failed
    attempt's addresses from it and fail to connect or hang until the timeout, depending on which rank writes its
    address first (PyTorch issues #135712, #167288: torch 2.13 keeps one store for every attempt). A restart that
    works by chance is no restart: say at once, in one line, how to restart reliably (docs/clusters.md)."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and os.environ.get(
            "TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise UsageError("torchrun restarted this run's processes on the store of the attempt that failed, whose "
                         "stale addresses they may try to connect to; for --max-restarts use the c10d rendezvous "
                         "(--standalone or --rdzv-backend c10d) with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
                         "torchrun's environment, and --resume auto")


def train(cfg: TrainConfig) -> Path:
    """Run training; return the run directory."""
    maybe_relaunch_on_all_gpus()
    refuse_a_restart_on_a_stale_store()
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


def _run(cfg: TrainConfig, manifest: dict[str, Any]) -> Path:
    dataset_path = Path(cfg.dataset_path)  # type: ignore[arg-type]
    train_ds, test_ds = load_split(dataset_path, "train"), load_split(dataset_path, "test")
    try:
        tokenizer = load_tokenizer_dir(dataset_path)  # checked files, no library output before the one line
    except BadTokenizer as e:
        raise UsageError(f"{dataset_path}: its tokenizer cannot be loaded ({e.cause}); preprocess the data "
                         "again") from None
    plan = make_plan(cfg, manifest, len(train_ds), tokenizer.eos_token_id)
    run_dir = plan.resume.run_dir if plan.resume is not None else new_run_dir(plan.cfg, Path(cfg.output_dir))
    with own_run(run_dir):
        run = build(plan, run_dir, train_ds, test_ds)
        fit(plan, run)
        publish(plan, run, tokenizer)
    return run_dir


@contextlib.contextmanager
def own_run(run_dir: Path) -> Iterator[None]:
    """One writer per run directory: rank 0 owns it (RUN/.lock) from before its record is touched until the run
    ends, so a second `--resume` of a live run is refused in one line with the holder's PID and changes
    nothing; the staging a killed run left (a final_model half written) goes."""
    if not is_main_process():
        yield
        return
    with DirectoryOwner(run_dir, "training run", lock_path=run_dir / RUN_LOCK,
                        hint="wait for it to end, or stop it (Ctrl-C) and resume it then"):
        remove_dead_staging(run_dir, ".final_model.tmp-")  # _save_final_model's files.temp_name
        yield


@dataclass
class Run:
    """A built run: its directory, the trainer, and the callbacks `fit` asks how training ended."""

    run_dir: Path
    trainer: Any
    health: Any  # trainer.StepHealth
    stopper: Any  # trainer.StopOnSignal
    console: Any  # trainer.ConsoleCallback
    parameters: int


def build(plan: TrainPlan, run_dir: Path, train_ds: Any, test_ds: Any) -> Run:
    """The model (random, or --init-from's), the run's record, and the trainer that fits it."""
    from transformers import set_seed

    from gpt2_dutch.train.trainer import (
        GPT2Trainer,
        MaxTimeCallback,
        StepHealth,
        StopOnSignal,
        build_training_arguments,
        install_console,
        metrics_callbacks,
    )

    cfg = plan.cfg
    set_seed(cfg.seed)
    model = _initial_model(plan.model_config, plan.init_source)
    parameters = sum(p.numel() for p in model.parameters())
    record_start(plan, run_dir, parameters, flops_per_token(matmul_params(model), plan.model_config.n_layer,
                                                            plan.model_config.n_embd, plan.context))
    if cfg.report_to == "tensorboard" and not _USER_TENSORBOARD_DIR:
        # The Trainer would log under checkpoints/runs/<date>; keep the run's event files beside its metrics.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    schedule = make_schedule(cfg.schedule, plan.total_steps, plan.warmup_steps, cfg.cooldown)
    health, stopper = StepHealth(sync=cfg.fsdp), StopOnSignal()
    if plan.optimizer_notice and is_main_process():
        print(plan.optimizer_notice, file=sys.stderr)
    trainer = GPT2Trainer(
        model=model, args=build_training_arguments(plan, run_dir), train_dataset=train_ds, eval_dataset=test_ds,
        data_collator=collate, callbacks=[health, stopper, *metrics_callbacks(plan, run_dir, schedule)],
        plan=plan, schedule=schedule, health=health)
    fitting = next((c for c in trainer.callback_handler.callbacks if isinstance(c, MaxTimeCallback)), None)
    if fitting is not None and cfg.eval_chunks is None:
        def _refit_eval_chunks(total: int) -> None:  # an unfitted --max-time run chooses it once its length is known
            trainer.eval_chunks = auto_eval_chunks(total, plan.chunks_per_step)
            if is_main_process():
                update_run_config(run_dir, eval_chunks_per_evaluation=trainer.eval_chunks)

        fitting.fit_listeners.append(_refit_eval_chunks)
    # rank 0 prints; --quiet wins over --log-format (a script that asks for silence gets silence)
    console = install_console(trainer, "quiet" if cfg.quiet or not is_main_process() else cfg.log_format)
    return Run(run_dir, trainer, health, stopper, console, parameters)


def record_start(plan: TrainPlan, run_dir: Path, parameters: int, flops: float) -> None:
    """A new run's run_config.json (the plan's settings and what it decided), or a resumed one marked running
    again, with metrics.jsonl cut back to its checkpoint."""
    if not is_main_process():
        return
    resume = plan.resume
    if resume is None:
        info = {
            "model_size": plan.cfg.model_size, "dataset_path": str(Path(plan.cfg.dataset_path).resolve()),
            "precision": plan.precision, "learning_rate": plan.cfg.learning_rate, "total_steps": plan.total_steps,
            "length_set_by": plan.length_set_by, "tokens_per_step": plan.tokens_per_step,
            "world_size": world_size(), "context": plan.context, "eval_chunks_per_evaluation": plan.eval_chunks,
            "vocab_size": plan.vocab_size, "parameters": parameters, "flops_per_token": flops,
            **({"muon_lr": MUON_LR} if plan.optimizer == "muon" else {}),
            **({"chosen_for_budget": plan.budget_choices} if plan.budget_choices else {}),
        }
        write_run_config(run_dir, run_config_dict(
            plan.cfg, **info, status="running", started_at=datetime.now().isoformat(timespec="microseconds")))
        return
    keep_metrics_up_to(run_dir, checkpoint_step(resume.checkpoint))
    changes: dict[str, Any] = {"status": "running"}
    if resume.extended_from is not None:  # say in the run's own record how far and from where it grew
        extensions = read_run_config(run_dir).get("extensions", [])
        changes.update(total_steps=plan.total_steps, max_steps=plan.total_steps, length_set_by="max_steps",
                       extensions=[*extensions, {"from_step": resume.extended_from, "to_step": plan.total_steps}])
    update_run_config(run_dir, **changes)


def fit(plan: TrainPlan, run: Run) -> None:
    """Train to the plan's end (or a signal, or divergence), then evaluate the final weights; a run that did not
    end well is recorded as such and reported in one line."""
    from gpt2_dutch.train.trainer import weights_finite

    cfg, trainer, run_dir, health, stopper = plan.cfg, run.trainer, run.run_dir, run.health, run.stopper
    checkpoint = plan.resume.checkpoint if plan.resume is not None else None
    what = f"a {cfg.max_time} budget" if plan.length_set_by == "max_time" else f"{plan.total_steps} steps"
    if checkpoint is not None:
        what += f", resuming at step {checkpoint_step(checkpoint)} from {checkpoint}"
    if not cfg.quiet and is_main_process():
        print(f"training {cfg.model_size} ({run.parameters / 1e6:.1f}M parameters) on {cfg.dataset_path} for "
              f"{what} ({plan.tokens_per_step:,} tokens/step, {plan.precision}) -> {run_dir}", file=sys.stderr)
    with _disk_full_is_one_line(run_dir, trainer), stopper.installed():
        try:
            try:
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            except pickle.UnpicklingError as e:  # torch.load(weights_only) refused a file plan.py did not check
                _set_status(run_dir, "failed")
                raise UsageError(f"cannot resume from {checkpoint}: a file there holds objects that are never "
                                 f"unpickled ({first_line(e, 160)}); pass an earlier checkpoint with --resume, or "
                                 "start a new run") from None
            if stopper.signal is None and not health.diverged:
                evals = [r for r in trainer.state.log_history if "eval_loss" in r]
                if not evals or evals[-1].get("step") != trainer.state.global_step:
                    trainer.evaluate()  # always end with an evaluation of the final weights
        finally:
            run.console.close()  # before any error line: a bar left open would redraw itself below it
    step = trainer.state.global_step
    if stopper.signal is not None:
        _set_status(run_dir, "stopped")
        raise Stopped(f"stopped by {stopper.signal_name} at step {step}; checkpoint saved in "
                      f"{run_dir / 'checkpoints'}; continue with the same command and --resume {run_dir} (or a "
                      "bare --resume)", 128 + stopper.signal)
    if health.diverged:
        _set_status(run_dir, "diverged")
        kept = usable_checkpoint(run_dir)
        raise UsageError(f"training diverged: {health.in_a_row} steps in a row had a non-finite loss or gradient "
                         f"(from step {health.first_bad_of_streak}); nothing was published" +
                         (f", the last good checkpoint is {kept}" if kept else " and no checkpoint was written") +
                         f"; lower --learning-rate (it was {cfg.learning_rate:g}) or use --precision fp32, and "
                         "start again")
    finite = weights_finite(trainer.model, sync=cfg.fsdp)
    if health.applied == 0 and checkpoint is None or not finite:
        _set_status(run_dir, "failed")
        why = ("no optimizer step was applied" if finite
               else "the weights are not finite")
        raise UsageError(f"the run ended but {why}; nothing was published as final_model; lower --learning-rate "
                         "or check the data")


def publish(plan: TrainPlan, run: Run, tokenizer: Any) -> None:
    """final_model (complete before it appears), the run marked finished, -latest, and --push-to-hub. Every rank
    comes here: under FSDP the full weights are gathered from all of them; rank 0 alone writes."""
    with _disk_full_is_one_line(run.run_dir, run.trainer):
        _save_final_model(run.trainer, tokenizer, run.run_dir)
    if not is_main_process():
        return
    _set_status(run.run_dir, FINISHED)
    update_latest_link(run.run_dir, plan.cfg.model_size)
    print(f"final model: {run.run_dir / 'final_model'}  (loss curve: {run.run_dir / 'loss.png'})", file=sys.stderr)
    if plan.cfg.push_to_hub:
        push_after_training(run.run_dir, plan.cfg.push_to_hub, plan.cfg.private)


def run_config_dict(cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    """The run's settings (every TrainConfig field) and `extra` run information, marked as a run's record so
    that `train --config run_config.json` replays the settings (see gpt2_dutch.core.options)."""
    d = {"format": TrainConfig.RECORD_FORMAT, **asdict(cfg)}
    d.update(extra)
    return d


def new_run_dir(cfg: TrainConfig, output_dir: Path) -> Path:
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


def _save_final_model(trainer: Any, tokenizer: Any, run_dir: Path) -> None:
    """Called on every rank (save_model gathers an FSDP model's shards collectively); rank 0 stages and writes."""
    from transformers import GenerationConfig

    main = is_main_process()
    final, tmp = run_dir / "final_model", temp_name(run_dir / "final_model")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        trainer.save_model(str(tmp))  # writes on rank 0 only (args.should_save)
        if not main:
            return
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the run's settings are in run_config.json
        tokenizer.save_pretrained(str(tmp))
        eos = tokenizer.eos_token_id
        GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=True, top_k=50,
                         top_p=0.95, temperature=0.8, max_new_tokens=100).save_pretrained(str(tmp))
        write_card(tmp, run_dir, hardware=describe_hardware())  # README.md and loss.png, inside the staging dir
        replace_dir(tmp, final)  # an extended run's previous final_model stays until the new one is complete
    finally:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
