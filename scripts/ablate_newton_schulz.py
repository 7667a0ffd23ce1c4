"""A bf16 run with Muon's Newton-Schulz in bf16 (the default now) or fp32 (NS_FP32=1): held-out loss at a fixed
step count, for docs/experiments/optimizer.md.

    gpt2-dutch preprocess --data-files CORPUS --vocab-size 8192 --chunk-size 256 --output-dir D --name dutch
    SIZE=tiny STEPS=100 .venv/bin/python scripts/ablate_newton_schulz.py SEED OUT D/dutch            # bf16 iteration
    NS_FP32=1 SIZE=tiny STEPS=100 .venv/bin/python scripts/ablate_newton_schulz.py SEED OUT D/dutch  # fp32
"""
import json
import os
import sys
import time

import torch

import gpt2_dutch.train.muon as muon
from gpt2_dutch.train import TrainConfig, train

if os.environ.get("NS_FP32"):
    init = muon.MuonAdamW.__init__
    def fp32_init(self, groups, ns_dtype=None):
        init(self, groups, ns_dtype=torch.float32)
    muon.MuonAdamW.__init__ = fp32_init
seed, out, dataset = int(sys.argv[1]), sys.argv[2], sys.argv[3]
t = time.perf_counter()
run = train(TrainConfig(dataset_path=dataset, model_size=os.environ.get("SIZE", "nano"), batch_size=8,
                        precision="bf16", output_dir=out, max_steps=int(os.environ.get("STEPS", "150")), seed=seed,
                        eval_every=10**6, quiet=True))
evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
summary = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "train_runtime" in l]
print(json.dumps({"seed": seed, "ns": "fp32" if os.environ.get("NS_FP32") else "bf16", "eval_loss": evals[-1]["eval_loss"],
                  "eval_bpb": evals[-1]["eval_bpb"], "train_runtime": summary[-1]["train_runtime"]}))
