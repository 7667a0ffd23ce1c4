"""train in several processes: two-process DDP on CPU (AdamW, Muon, and --model-size auto with rank 0's choices).
A SIGKILL and a --resume that ends with the same weights: tests/e2e/test_multiprocess.py (a rank killed mid-save,
the group restarted, then stopped and resumed: every loss and weight equal to an uninterrupted run's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import NANO, metrics

# `gpt2-dutch train` with each rank on its own fake clock and its own measured speeds, so what the test asserts
# never depends on how fast the machine is: rank 0 steps in 0.2 s and measures speeds that give pico, rank 1 steps
# in 0.3 s and measures speeds that would give nano
TWO_RANKS = textwrap.dedent("""
    import os, sys
    import gpt2_dutch.train.budget as budget
    from gpt2_dutch.__main__ import main
    from gpt2_dutch.train.trainer import MaxTimeCallback

    rank = int(os.environ["RANK"])
    tick, clock = (0.1, 0.15)[rank], [0.0]  # two readings a step

    def now(self):
        clock[0] += tick
        return clock[0]

    speeds = ({"pico": 1e3, "nano": 5e2, "tiny": 2e2},
              {"pico": 4e6, "nano": 2e6, "tiny": 1e6, "small": 2e5, "medium": 7e4})[rank]  # tokens/s
    MaxTimeCallback.now = now
    budget.measure_tokens_per_s = lambda size, *args, **kwargs: speeds[size]
    budget.measure_optimizer_step_s = lambda size, *args, **kwargs: 0.0
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_two_ranks_train_with_rank_zeros_choices(tiny_dataset, tmp_path):
    """Each rank measures its own speed; rank 0's choice is broadcast, so both build the same model and batch,
    and both fit the same --max-time length."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "train", "--dataset-path", str(tiny_dataset), "--model-size", "auto", "--max-time", "3s",
           "--precision", "fp32", "--output-dir", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = [p for p in (tmp_path / "out").glob("gpt2-dutch-*-2*") if p.is_dir()]
    rc = json.loads((run / "run_config.json").read_text())
    assert rc["world_size"] == 2 and rc["model_size"] == rc["chosen_for_budget"]["model_size"]["chosen"] == "pico"
    assert rc["tokens_per_step"] == rc["batch_size"] * rc["gradient_accumulation_steps"] * 2 * rc["context"]
    assert r.stderr.count("--model-size auto:") == 1  # printed once, by rank 0
    # the --max-time (re)fits agree across ranks (each all-reduces its clock): both stop at the fitted length
    # (a rank stepping once more would wait in its all-reduce forever), which the final evaluation shows
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rc["length_set_by"] == "max_time" and [r["step"] for r in records if "eval_loss" in r][-1] == rc[
        "total_steps"]


@pytest.fixture(scope="module")
def ddp_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output directory of one 6-step Muon run on two gloo ranks (Muon: the default, named here so that the
    Muon test stays one if the default changes)."""
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "gpt2_dutch", "train", "--dataset-path", str(tiny_dataset), *NANO, "--output-dir", str(out),
           "--max-steps", "6", "--eval-every", "3", "--save-every", "3", "--optimizer", "muon"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_muon_under_two_process_ddp_on_cpu(ddp_run):
    """DDP all-reduces the gradients before the step: every rank orthogonalizes the same momentum."""
    (run,) = ddp_run.glob("gpt2-dutch-nano-2*")
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["world_size"] == 2 and saved["optimizer"] == "muon"
    losses = [r["loss"] for r in metrics(run) if r.get("loss") is not None]
    assert losses[-1] < losses[0]
    assert (run / "final_model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_process_ddp_on_cpu(ddp_run):
    runs = list(ddp_run.glob("gpt2-dutch-nano-2*"))
    assert len(runs) == 1  # both ranks agreed on one run directory; only rank 0 wrote
    m = metrics(runs[0])
    assert json.loads((runs[0] / "run_config.json").read_text())["world_size"] == 2
    assert [r["tokens"] for r in m if "loss" in r][-1] == 6 * 2 * 4 * 32  # two ranks' batches per step
    assert (runs[0] / "final_model" / "model.safetensors").is_file()
