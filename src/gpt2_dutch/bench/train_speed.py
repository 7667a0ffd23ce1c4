"""Training: gpt2-dutch train vs a run_clm-style fp32 Trainer, in tokens/s and as a fraction of the matmul peak.

Our speed is read from what every run publishes, not from a hook inside it: with a log record every step,
metrics.jsonl holds each step's tokens_per_s (measured from one log record to the next) and run_config.json
the tokens per step.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import sys
from pathlib import Path
from typing import Any

from gpt2_dutch.bench.report import say
from gpt2_dutch.runs.records import read_metrics, read_run_config

WARMUP_STEPS = 2  # the first steps pay for allocation (and, with --compile, compilation): not counted


def bench_train(text: Path, tokenizer: str, tmp: Path, quick: bool, limits: dict[str, Any]) -> dict[str, Any]:
    from gpt2_dutch.bench.baselines import StepTimer, train_recipe
    from gpt2_dutch.preprocess import PreprocessConfig, preprocess
    from gpt2_dutch.train import TrainConfig, train

    seq = 128 if quick else 512
    dataset = preprocess(PreprocessConfig(data_files=[str(text)], tokenizer=tokenizer, chunk_size=seq,
                                          output_dir=str(tmp), name=f"train-{seq}"))
    warmup = WARMUP_STEPS
    # (name, size, batch, timed steps, --compile); --compile is what the README recommends for long runs
    plan = [("tiny", "tiny", 8, 3 if quick else 10, False)]
    if not quick:
        plan += [("small", "small", 4, 6, False), ("small_compile", "small", 4, 6, True)]
    out: dict[str, Any] = {"sequence": seq, "warmup_steps": warmup}
    recipe_tps: dict[str, float] = {}
    peaks = limits["matmul_flops"]
    for name, size, batch, timed, compile_ in plan:
        steps = warmup + timed
        if size not in recipe_tps:
            say(f"train {size} at {batch}x{seq}: a run_clm-style fp32 Trainer (baseline)")
            timer = StepTimer()
            train_recipe(str(dataset), size, batch, steps, str(tmp / "recipe-run"), timer)
            recipe_tps[size] = batch * seq / timer.median_step_s(warmup)
            gc.collect()
        say(f"train {size} at {batch}x{seq}: gpt2-dutch{' --compile' if compile_ else ''}")
        # log_every=1: a tokens/s figure for every step. The Trainer prints each log record on stdout, which is
        # the report's; they go to stderr with the progress bar.
        with contextlib.redirect_stdout(sys.stderr):
            run = train(TrainConfig(dataset_path=str(dataset), model_size=size, batch_size=batch, max_steps=steps,
                                    warmup=0, eval_every=10**6, save_every=10**6, log_every=1, eval_chunks=batch,
                                    compile=compile_, output_dir=str(tmp / "runs"), keep_checkpoints=1))
        gc.collect()
        info = read_run_config(run)
        ours_tps = median_tokens_per_s(read_metrics(run), info["tokens_per_step"], warmup)
        flops = info["flops_per_token"]
        out[name] = {
            "model_size": size, "compile": compile_, "batch": batch, "timed_steps": timed,
            "parameters": info["parameters"], "flops_per_token": flops, "ours_precision": info["precision"],
            "ours_tokens_per_s": ours_tps, "recipe_tokens_per_s": recipe_tps[size],
            "speedup": ours_tps / recipe_tps[size],
            "ours_mfu": ours_tps * flops / peaks.get(info["precision"], peaks["fp32"]),
            "recipe_mfu": recipe_tps[size] * flops / peaks["fp32"],
        }
    return out


def median_tokens_per_s(records: list[dict[str, Any]], tokens_per_step: int, warmup: int) -> float:
    """tokens/s of the median step after the first `warmup` steps, from a run logged every step.

    Each record's tokens_per_s covers the steps since the previous record: with log_every=1, exactly its own step.
    The median is taken over step times (as for the baseline's StepTimer), then turned back into tokens/s."""
    seconds = [tokens_per_step / r["tokens_per_s"] for r in records
               if r.get("tokens_per_s") and r.get("step", 0) > warmup]
    if not seconds:
        raise RuntimeError("no timed steps in metrics.jsonl: log every step and raise the step count above the "
                           "warm-up")
    return tokens_per_step / statistics.median(seconds)
