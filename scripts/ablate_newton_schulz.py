"""A bf16 run with Muon's Newton-Schulz in bf16 (the default now) or fp32 (NS_FP32=1): held-out loss at a fixed
step count, for docs/experiments/optimizer.md.

    gpt2-dutch preprocess --data-files CORPUS --vocab-size 8192 --chunk-size 256 --output-dir D --name dutch
    SIZE=tiny STEPS=100 .venv/bin/python scripts/ablate_newton_schulz.py SEED OUT D/dutch            # bf16 iteration
    NS_FP32=1 SIZE=tiny STEPS=100 .venv/bin/python scripts/ablate_newton_schulz.py SEED OUT D/dutch  # fp32
"""
import json
import os
import sys

import torch

import gpt2_dutch.train.muon as muon
from gpt2_dutch.runs.records import metrics_of_kind, read_metrics
from gpt2_dutch.train import TrainConfig, train

if os.environ.get("NS_FP32"):
    init = muon.MuonAdamW.__init__
    def fp32_init(self, groups, ns_dtype=None):
        init(self, groups, ns_dtype=torch.float32)
    muon.MuonAdamW.__init__ = fp32_init
seed, out, dataset = int(sys.argv[1]), sys.argv[2], sys.argv[3]
run = train(TrainConfig(dataset_path=dataset, model_size=os.environ.get("SIZE", "nano"), batch_size=8,
                        precision="bf16", output_dir=out, max_steps=int(os.environ.get("STEPS", "150")), seed=seed,
                        eval_every=10**6, quiet=True))
records = read_metrics(run)
last_eval, summary = metrics_of_kind(records, "eval")[-1], metrics_of_kind(records, "summary")[-1]
print(json.dumps({"seed": seed, "ns": "fp32" if os.environ.get("NS_FP32") else "bf16",
                  "eval_loss": last_eval["eval_loss"], "eval_bpb": last_eval["eval_bpb"],
                  "train_runtime": summary["train_runtime"]}))
