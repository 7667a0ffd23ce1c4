"""Train GPT-2 from scratch on a processed dataset (one CPU to many GPUs; HF Trainer + accelerate underneath).

    gpt2-dutch train --dataset-path processed_data/chunked_10k --model-size tiny --max-time 5m
    gpt2-dutch train --dataset-path processed_data/chunked_1B --model-size small --batch-size 16
    torchrun --nproc_per_node 8 -m gpt2_dutch train --dataset-path ... --model-size medium
    gpt2-dutch train --dataset-path ... --model-size small --resume          # continue the latest run

A run writes trained_models/gpt2-dutch-<size>-<timestamp>/ with checkpoints/, final_model/ (safetensors),
metrics.jsonl, run_config.json and loss.png; trained_models/gpt2-dutch-<size>-latest points to it.
Every token, <|endoftext|> included, is a target; chunks need no padding and training never tokenizes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import option
from .data import load_split, read_manifest
from .errors import UsageError, check
from .model import MODEL_PRESETS, flops_per_token, gpt2_config, matmul_params, preset

MAX_CONTEXT = 16384  # dense attention beyond this needs more memory than any preset is sized for
MIN_LR_RATIO = 0.1  # cosine decay ends at 10% of the peak (GPT-3 / Chinchilla practice)
_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")  # a directory the user chose wins


@dataclass
class TrainConfig:
    dataset_path: str | None = option(None, "processed dataset directory (from `gpt2-dutch preprocess`)")
    model_size: str = option("small", f"GPT-2 shape: {', '.join(MODEL_PRESETS)}")
    epochs: float = option(1.0, "passes over the training split (ignored when a --max-* limit is given)")
    batch_size: int = option(8, "chunks per device per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    max_steps: int | None = option(None, "stop after this many optimizer steps")
    max_tokens: float | None = option(None, "stop after this many training tokens (e.g. 5e8)")
    max_time: str | None = option(None, "wall-clock budget for the training steps (e.g. 90s, 30m, 2h; evaluations "
                                  "and checkpoints come on top): speed is measured over the first steps, then the "
                                  "step count is fixed so the schedule ends properly")
    learning_rate: float | None = option(None, "peak learning rate (default per size: tiny 2e-3, small 6e-4, "
                                         "medium 3e-4, large 2.5e-4, xl 2e-4)")
    warmup: float = option(0.05, "linear warmup: a fraction of the run if < 1, else a number of steps")
    weight_decay: float = option(0.1, "AdamW weight decay on weight matrices (not biases or LayerNorms)")
    seed: int = option(42, "seed for weights, data order and everything random")
    output_dir: str = option("trained_models", "where runs are written")
    resume: str | None = option(None, "continue from a checkpoint: without a value the newest checkpoint of the "
                                "latest run of --model-size; or a checkpoint or run directory", nargs="?",
                                const="latest")
    precision: str = option("auto", "auto: bf16 where supported (GPUs with bf16, CPUs with AVX512-BF16/AMX), "
                            "fp16 with loss scaling on older GPUs, else fp32",
                            choices=["auto", "bf16", "fp16", "fp32"])
    compile: bool = option(False, "torch.compile the model")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    eval_every: int | None = option(None, "evaluate every N steps (default: 10 times per run)")
    eval_chunks: int = option(1000, "test chunks used per evaluation (0: the whole test split)")
    save_every: int | None = option(None, "checkpoint every N steps (default: 10 times per run)")
    keep_checkpoints: int = option(2, "keep the newest K checkpoints")
    log_every: int | None = option(None, "log train loss every N steps (default: ~100 times per run)")
    report_to: str = option("none", "experiment tracker", choices=["none", "tensorboard", "wandb", "trackio"])
    use_wandb: bool = option(False, "same as --report-to wandb (the seed's flag)")
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state (FSDP) across GPUs: for large/xl")
    num_workers: int = option(0, "DataLoader worker processes (the data is memory-mapped; 0 is usually enough)")

    def __post_init__(self) -> None:
        check(self.dataset_path is not None, "--dataset-path is required (a directory made by `gpt2-dutch "
              "preprocess`)")
        preset(self.model_size)
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "eval_every", "save_every",
                     "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            check(value is None or value > 0, f"--{name.replace('_', '-')} must be positive (got {value})")
        for name in ("epochs", "max_tokens", "learning_rate"):
            value = getattr(self, name)
            check(value is None or value > 0, f"--{name.replace('_', '-')} must be positive (got {value})")
        check(self.warmup >= 0, f"--warmup must be >= 0 (got {self.warmup})")
        check(self.eval_chunks >= 0, "--eval-chunks must be >= 0")
        if self.max_time is not None:
            self.max_time_s = parse_duration(self.max_time)
        else:
            self.max_time_s = None
        if self.use_wandb:
            self.report_to = "wandb"


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|)\s*", text)
    check(m is not None and float(m.group(1)) > 0, f"--max-time '{text}' is not a positive duration like 90s, "
          "30m or 2h")
    assert m is not None
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# ------------------------------------------------------------------------------------------ schedule

class WarmupCosine:
    """LR multiplier: linear warmup to 1, then cosine decay to MIN_LR_RATIO at exactly `total_steps`.

    `total_steps` may be changed after the start (a --max-time run fits it once speed is known); the schedule
    then stays continuous because it is a pure function of the step.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float = MIN_LR_RATIO):
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps_for(warmup: float, total_steps: int) -> int:
    return int(warmup * total_steps) if warmup < 1 else int(warmup)


# ------------------------------------------------------------------------------------------ devices

def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        if requested == "fp16":
            check(torch.cuda.is_available(), "--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def maybe_relaunch_on_all_gpus() -> None:
    """With several GPUs and no launcher, re-run this very command under torchrun: one process per GPU (DDP),
    never the slow single-process nn.DataParallel fallback."""
    n = torch.cuda.device_count()
    if n <= 1 or "LOCAL_RANK" in os.environ or os.environ.get("GPT2_DUTCH_NO_RELAUNCH"):
        return
    print(f"{n} GPUs found: relaunching with torchrun --nproc_per_node {n} (DDP)", file=sys.stderr)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           *sys.orig_argv[1:]]
    raise SystemExit(subprocess.call(cmd))


# ------------------------------------------------------------------------------------------ run dirs

def find_checkpoint(spec: str, output_dir: Path, size: str) -> Path:
    """Resolve --resume: 'latest', a run directory, or a checkpoint directory -> the checkpoint to load."""
    path = output_dir / f"gpt2-dutch-{size}-latest" if spec == "latest" else Path(spec)
    if not path.exists():
        raise UsageError(f"cannot resume: {path} does not exist" + (
            f" (no earlier {size} run in {output_dir})" if spec == "latest" else ""))
    path = path.resolve()
    if (path / "trainer_state.json").is_file():
        return path
    checkpoints = sorted((path / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not checkpoints:
        raise UsageError(f"cannot resume: {path} holds no checkpoint (neither trainer_state.json nor checkpoints/)")
    return checkpoints[-1]


def update_latest_link(run_dir: Path, size: str) -> None:
    link = run_dir.parent / f"gpt2-dutch-{size}-latest"
    tmp = run_dir.parent / f".{link.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)  # atomic: the link always points at a complete run directory name


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ training

def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows]).astype(np.int64))
    return {"input_ids": ids, "labels": ids}  # the model shifts labels itself; every token is a target


def train(cfg: TrainConfig, callbacks: list[Any] | None = None) -> Path:
    """Run training; return the run directory. `callbacks`: extra TrainerCallbacks (the benchmark's timer)."""
    maybe_relaunch_on_all_gpus()
    manifest = read_manifest(cfg.dataset_path)  # type: ignore[arg-type]
    try:
        return _run(cfg, manifest, callbacks or [])
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
    check(per_epoch > 0 or cfg.max_steps or cfg.max_tokens, f"the training split has {n_train_chunks} chunks, "
          f"fewer than one optimizer step needs ({cfg.batch_size * world_size() * cfg.gradient_accumulation_steps})"
          "; lower --batch-size / --gradient-accumulation-steps")
    if cfg.max_steps:
        return cfg.max_steps, "max_steps"
    if cfg.max_tokens:
        return max(1, math.ceil(cfg.max_tokens / tokens_per_step)), "max_tokens"
    steps = max(1, int(per_epoch * cfg.epochs))
    if cfg.max_time_s:  # an upper bound until the speed of the first steps is measured
        return 10**9, "max_time"
    return steps, "epochs"


def run_config_dict(cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    d = asdict(cfg)
    d.update(extra)
    return d


def _run(cfg: TrainConfig, manifest: dict[str, Any], extra_callbacks: list[Any]) -> Path:
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    dataset_path = Path(cfg.dataset_path)  # type: ignore[arg-type]
    context, vocab_size = int(manifest["chunk_size"]), int(manifest["vocab_size"])
    check(context <= MAX_CONTEXT, f"the dataset's chunks are {context} tokens, longer than the {MAX_CONTEXT} "
          "this trainer allows; preprocess with a smaller --chunk-size (GPT-2 uses 1024)")
    train_ds, test_ds = load_split(dataset_path, "train"), load_split(dataset_path, "test")
    if cfg.eval_chunks and len(test_ds) > cfg.eval_chunks:
        test_ds = test_ds.select(range(cfg.eval_chunks))
    tokenizer = AutoTokenizer.from_pretrained(str(dataset_path))
    precision = resolve_precision(cfg.precision)
    _check_tracker(cfg.report_to)
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size() * context
    total_steps, limit = plan_steps(cfg, len(train_ds), tokens_per_step)
    output_dir = Path(cfg.output_dir)

    checkpoint = find_checkpoint(cfg.resume, output_dir, cfg.model_size) if cfg.resume else None
    if checkpoint is not None:
        run_dir = checkpoint.parent.parent
        saved = _check_resumable(checkpoint, run_dir, cfg, manifest)
        total_steps = saved.get("total_steps", total_steps)
    else:
        state = PartialState()  # joins the process group under torchrun, so ranks agree on one run name
        name = [f"gpt2-dutch-{cfg.model_size}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
        if state.num_processes > 1:
            broadcast_object_list(name)
        run_dir = output_dir / name[0]
        if is_main_process():
            try:
                (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot write to --output-dir {output_dir} ({e.strerror})") from None

    set_seed(cfg.seed)
    model_config = gpt2_config(cfg.model_size, vocab_size, context, tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa")
    lr = cfg.learning_rate or preset(cfg.model_size).learning_rate
    schedule = WarmupCosine(total_steps, warmup_steps_for(cfg.warmup, total_steps))
    auto_every = max(1, total_steps // 10) if limit != "max_time" else 10**9
    eval_every = cfg.eval_every or auto_every
    save_every = cfg.save_every or auto_every
    log_every = cfg.log_every or (max(1, total_steps // 100) if limit != "max_time" else 10)
    run_info = {
        "model_size": cfg.model_size, "dataset_path": str(dataset_path.resolve()), "precision": precision,
        "learning_rate": lr, "total_steps": total_steps, "length_set_by": limit,
        "tokens_per_step": tokens_per_step, "world_size": world_size(), "context": context,
        "vocab_size": vocab_size, "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token(matmul_params(model), model_config.n_layer, model_config.n_embd, context),
    }
    if is_main_process():
        write_json_atomic(run_dir / "run_config.json", run_config_dict(cfg, max_time_s=cfg.max_time_s, **run_info))
    if cfg.report_to == "tensorboard" and not _USER_TENSORBOARD_DIR:
        # The Trainer would log under checkpoints/runs/<date>; keep the run's event files beside its metrics.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")

    from .training_loop import GPT2Trainer, attach_progress_bar, build_training_arguments, metrics_callbacks

    args = build_training_arguments(cfg, run_dir, precision, lr, total_steps, eval_every, save_every, log_every)
    trainer = GPT2Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=test_ds, data_collator=collate,
        callbacks=metrics_callbacks(cfg, run_dir, run_info, manifest, schedule, auto_eval=cfg.eval_every is None,
                                    auto_save=cfg.save_every is None) + extra_callbacks,
        schedule=schedule, keep_checkpoints=cfg.keep_checkpoints, tokens_per_step=tokens_per_step,
        bytes_per_token=_bytes_per_token(manifest),
    )
    attach_progress_bar(trainer)
    print(f"training {cfg.model_size} ({run_info['parameters'] / 1e6:.1f}M parameters) on {dataset_path} for "
          f"{'a ' + str(cfg.max_time) + ' budget' if limit == 'max_time' else f'{total_steps} steps'} "
          f"({tokens_per_step:,} tokens/step, {precision}) -> {run_dir}", file=sys.stderr)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    if not evals or evals[-1].get("step") != trainer.state.global_step:
        trainer.evaluate()  # always end with an evaluation of the final weights
    if is_main_process():
        _save_final_model(trainer, tokenizer, run_dir)
        update_latest_link(run_dir, cfg.model_size)
        print(f"final model: {run_dir / 'final_model'}  (loss curve: {run_dir / 'loss.png'})", file=sys.stderr)
    return run_dir


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


def _check_resumable(checkpoint: Path, run_dir: Path, cfg: TrainConfig, manifest: dict[str, Any]) -> dict:
    config_path = checkpoint / "config.json"
    if not config_path.is_file() or not (checkpoint / "trainer_state.json").is_file():
        raise UsageError(f"cannot resume: {checkpoint} is incomplete (no config.json or trainer_state.json)")
    saved_model = json.loads(config_path.read_text())
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
    if problems:
        raise UsageError(f"cannot resume from {checkpoint}: " + "; ".join(problems))
    run_config = run_dir / "run_config.json"
    return json.loads(run_config.read_text()) if run_config.is_file() else {}


def _save_final_model(trainer: Any, tokenizer: Any, run_dir: Path) -> None:
    from transformers import GenerationConfig

    final, tmp = run_dir / "final_model", run_dir / ".final_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the run's settings are in run_config.json
    tokenizer.save_pretrained(str(tmp))
    eos = tokenizer.eos_token_id
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=True, top_k=50,
                     top_p=0.95, temperature=0.8, max_new_tokens=100).save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
