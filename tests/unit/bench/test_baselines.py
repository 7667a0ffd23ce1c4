"""bench/baselines.py: the step timer of the baseline loops."""

from __future__ import annotations

import pytest

from gpt2_dutch.bench.baselines import StepTimer


def test_step_timer_median_skips_warmup():
    timer = StepTimer()
    timer.ends = [0.0, 5.0, 6.0, 7.5, 8.5]  # a slow first step, then 1.0, 1.5, 1.0
    assert timer.median_step_s(warmup=1) == 1.0
    with pytest.raises(RuntimeError):
        timer.median_step_s(warmup=4)
