"""Training: gpt2-dutch train vs a run_clm-style fp32 Trainer, in tokens/s, as a fraction of the matmul peak, and
the optimizer's share of a step.

Our speed is read from what every run publishes, not from a hook inside it: with a log record every step,
metrics.jsonl holds each step's tokens_per_s (measured from one log record to the next) and run_config.json
the tokens per step. The optimizer's step is timed from outside too, by torch's global optimizer-step hooks
(OptimizerTimer), on both sides: its median seconds over the median step's are its share.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time
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
    # (name, size, batch, timed steps, --compile, --optimizer); --compile is what the README recommends for long
    # runs; small with AdamW beside the default Muon: what each optimizer's step costs at the same shape
    plan = [("tiny", "tiny", 8, 3 if quick else 10, False, "muon")]
    if not quick:
        plan += [("small", "small", 4, 6, False, "muon"), ("small_adamw", "small", 4, 6, False, "adamw"),
                 ("small_compile", "small", 4, 6, True, "muon")]
    out: dict[str, Any] = {"sequence": seq, "warmup_steps": warmup}
    recipe: dict[str, tuple[float, float]] = {}  # size -> (tokens/s, optimizer share)
    peaks = limits["matmul_flops"]
    for name, size, batch, timed, compile_, optimizer in plan:
        steps = warmup + timed
        if size not in recipe:
            say(f"train {size} at {batch}x{seq}: a run_clm-style fp32 Trainer (baseline)")
            timer = StepTimer()
            with OptimizerTimer() as recipe_optimizer:
                train_recipe(str(dataset), size, batch, steps, str(tmp / "recipe-run"), timer)
            step_s = timer.median_step_s(warmup)
            recipe[size] = (batch * seq / step_s, recipe_optimizer.median_s(warmup) / step_s)
            gc.collect()
        say(f"train {size} at {batch}x{seq}: gpt2-dutch --optimizer {optimizer}{' --compile' if compile_ else ''}")
        # log_every=1: a tokens/s figure for every step. The Trainer prints each log record on stdout, which is
        # the report's; they go to stderr with the progress bar.
        with contextlib.redirect_stdout(sys.stderr), OptimizerTimer() as ours_optimizer:
            run = train(TrainConfig(dataset_path=str(dataset), model_size=size, batch_size=batch, max_steps=steps,
                                    warmup=0, eval_every=10**6, save_every=10**6, log_every=1, eval_chunks=batch,
                                    compile=compile_, optimizer=optimizer, output_dir=str(tmp / "runs"),
                                    keep_checkpoints=1))
        gc.collect()
        info = read_run_config(run)
        ours_tps = median_tokens_per_s(read_metrics(run), info["tokens_per_step"], warmup)
        flops = info["flops_per_token"]
        recipe_tps, recipe_share = recipe[size]
        out[name] = {
            "model_size": size, "compile": compile_, "optimizer": info.get("optimizer", optimizer), "batch": batch,
            "timed_steps": timed, "parameters": info["parameters"], "flops_per_token": flops,
            "ours_precision": info["precision"], "ours_tokens_per_s": ours_tps, "recipe_tokens_per_s": recipe_tps,
            "speedup": ours_tps / recipe_tps,
            "ours_mfu": ours_tps * flops / peaks.get(info["precision"], peaks["fp32"]),
            "recipe_mfu": recipe_tps * flops / peaks["fp32"],
            # the optimizer's median step over the median step (both after the warm-up)
            "ours_optimizer_share": ours_optimizer.median_s(warmup) * ours_tps / info["tokens_per_step"],
            "recipe_optimizer_share": recipe_share,
        }
    return out


class OptimizerTimer:
    """Within `with`, the seconds of every optimizer step taken in this process (`durations`, in order), from
    torch's global optimizer-step hooks: any optimizer a Trainer builds, without reaching into it. A step inside a
    step (a wrapper stepping the optimizer it wraps) counts once, as the outer one. On CUDA the clock waits
    for the device on both sides."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._open: list[float] = []
        self._handles: list[Any] = []

    def _now(self) -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, *args: Any) -> None:
        self._open.append(self._now())

    def _post(self, *args: Any) -> None:
        started = self._open.pop()
        if not self._open:
            self.durations.append(self._now() - started)

    def __enter__(self) -> OptimizerTimer:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def median_s(self, warmup: int) -> float:
        """The median optimizer step after the first `warmup` ones."""
        timed = self.durations[warmup:]
        if not timed:
            raise RuntimeError("no timed optimizer steps: raise the step count above the warm-up")
        return statistics.median(timed)


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
