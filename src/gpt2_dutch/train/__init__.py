"""Train GPT-2 from scratch on a processed dataset (one CPU to many GPUs; HF Trainer + accelerate underneath).

    gpt2-dutch train --dataset-path processed_data/chunked_10k --model-size tiny --max-time 5m
    gpt2-dutch train --dataset-path processed_data/chunked_1B --model-size auto --max-time 2h   # size for the budget
    gpt2-dutch train --dataset-path processed_data/chunked_1B --model-size small --batch-size 16
    torchrun --nproc_per_node 8 -m gpt2_dutch train --dataset-path ... --model-size medium
    gpt2-dutch train --dataset-path ... --model-size small --resume          # continue the newest unfinished run
    gpt2-dutch train --config trained_models/gpt2-dutch-tiny-20261125-120000/run_config.json   # replay a run

A run writes trained_models/gpt2-dutch-<size>-<timestamp>/ with checkpoints/, final_model/ (safetensors),
metrics.jsonl, run_config.json and loss.png; trained_models/gpt2-dutch-<size>-latest points to the newest
finished one. Every token, <|endoftext|> included, is a target; chunks need no padding and training never
tokenizes.

The pieces, each with only its own concern:
    config.py    TrainConfig: every setting, its help and its checks (no torch)
    schedule.py  warmup, then wsd (stable, linear cooldown) or cosine-to-10%, fitted to the run's real length
    budget.py    for a --max-time/--max-tokens budget: --model-size auto and the tokens per step
    muon.py      --optimizer muon: Muon for the blocks' matrices, AdamW for the rest, one optimizer
    loss.py      the LM head's cross-entropy in chunks, without full logits
    plan.py      make_plan: every setting of the run resolved once (budget choices, resume, length, cadence)
    trainer.py   what the Hugging Face Trainer gets on top: health checks, signals, atomic checkpoints, metrics
    run.py       train(cfg): plan -> build -> fit -> publish
(run records and the model card: gpt2_dutch.runs)
"""

from __future__ import annotations

from typing import Any

from gpt2_dutch.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    # `train` pulls in torch and transformers: loaded when first used, so `--help` and config parsing stay light.
    if name == "train":
        from gpt2_dutch.train.run import train

        return train
    raise AttributeError(name)
