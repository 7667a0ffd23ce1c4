"""bench/train_speed.py: our training speed read from metrics.jsonl."""

from __future__ import annotations

import pytest

from gpt2_dutch.bench.train_speed import median_tokens_per_s


def test_our_train_speed_is_the_median_step_of_metrics_jsonl_after_the_warmup():
    # what a run logged every step publishes: no tokens_per_s on the first record (nothing to measure from)
    records = [{"step": 1, "loss": 9.0}, {"step": 2, "tokens_per_s": 100.0}, {"step": 3, "tokens_per_s": 400.0},
               {"step": 4, "tokens_per_s": 200.0}, {"step": 5, "tokens_per_s": 400.0},
               {"step": 6, "eval_loss": 8.0}, {"step": 6, "train_runtime": 3.0}]
    # steps 3..5 take 1, 2 and 1 s of 400 tokens: the median step is 1 s
    assert median_tokens_per_s(records, 400, warmup=2) == 400.0
    # the median of an even count is taken over step times, as for the baseline's StepTimer: (1 + 2) / 2 s
    assert median_tokens_per_s(records[:4], 400, warmup=2) == pytest.approx(400 / 1.5)
    with pytest.raises(RuntimeError):
        median_tokens_per_s(records, 400, warmup=5)
