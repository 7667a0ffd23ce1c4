"""train --fsdp on two CPU processes (gloo): the public FSDP settings, a record that says AdamW trained, and a
final_model gathered from both ranks' shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import TINY, metrics
from safetensors.torch import load_file


@pytest.mark.slow
def test_fsdp_on_two_ranks_publishes_the_whole_model_and_records_adamw(tiny_dataset, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "gpt2_dutch", "train", "--dataset-path", str(tiny_dataset), *TINY, "--output-dir", str(tmp_path),
           "--max-steps", "4", "--eval-every", "4", "--save-every", "4", "--fsdp"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "deprecated" not in r.stderr  # transformers' warning about the string form of `fsdp`
    assert r.stderr.count("--optimizer muon is not available with --fsdp") == 1  # rank 0's notice
    (run,) = tmp_path.glob("gpt2-dutch-tiny-2*")
    record = json.loads((run / "run_config.json").read_text())
    assert (record["optimizer"], record["fsdp"], record["world_size"], record["status"]) == ("adamw", True, 2,
                                                                                          "finished")
    weights = load_file(run / "final_model" / "model.safetensors")
    config = json.loads((run / "final_model" / "config.json").read_text())
    # every tensor whole (gathered, not one rank's shard) and trained
    assert weights["transformer.wte.weight"].shape == (config["vocab_size"], config["n_embd"])
    assert weights["transformer.h.0.mlp.c_fc.weight"].shape == (config["n_embd"], 4 * config["n_embd"])
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [m["step"] for m in metrics(run) if "eval_loss" in m][-1] == 4
