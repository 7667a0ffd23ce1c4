"""The records a run leaves say what happened: the training loop's rates count the steps it took."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2_dutch.runs.records import metrics_of_kind, read_metrics
from gpt2_dutch.train import TrainConfig, train


def _summary_rates(run_dir: Path) -> list[tuple[float, float, float]]:
    return [(r["train_runtime"], r["train_samples_per_second"], r["train_steps_per_second"])
            for r in metrics_of_kind(read_metrics(run_dir), "summary")]


@pytest.mark.slow
def test_the_loops_rates_count_the_steps_it_took_also_after_a_resume(tiny_dataset, tmp_path):
    cfg = dict(dataset_path=str(tiny_dataset), model_size="pico", batch_size=2, gradient_accumulation_steps=2,
               precision="fp32", output_dir=str(tmp_path), save_every=3, quiet=True)
    run = train(TrainConfig(**cfg, max_steps=3))
    train(TrainConfig(**cfg, max_steps=5, resume=str(run)))  # the extension trains steps 4 and 5
    (runtime1, samples1, steps1), (runtime2, samples2, steps2) = _summary_rates(run)
    for runtime, samples, steps, took in ((runtime1, samples1, steps1, 3), (runtime2, samples2, steps2, 2)):
        assert steps == pytest.approx(took / runtime, rel=1e-2, abs=1e-3)
        assert samples == pytest.approx(took * 4 / runtime, rel=1e-2, abs=1e-3)  # 2 chunks x 2 micro-batches


@pytest.mark.slow
def test_a_max_time_runs_rates_are_not_those_of_its_upper_bound(tiny_dataset, tmp_path):
    run = train(TrainConfig(dataset_path=str(tiny_dataset), model_size="pico", batch_size=2, precision="fp32",
                            output_dir=str(tmp_path), max_time="3s", learning_rate=1e-3, quiet=True))
    steps = max(r["step"] for r in read_metrics(run))
    ((runtime, samples, per_s),) = _summary_rates(run)
    assert samples == pytest.approx(steps * 2 / runtime, rel=1e-2, abs=1e-3)
    assert per_s == pytest.approx(steps / runtime, rel=1e-2, abs=1e-3)
