"""train/schedule.py: warmup then cosine, and wsd."""

from __future__ import annotations

import pytest

from gpt2_dutch.train.schedule import WarmupCosine


def test_schedule_warmup_then_cosine_to_ten_percent():
    s = WarmupCosine(total_steps=100, warmup_steps=10)
    lrs = [s(i) for i in range(101)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # linear rise
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then only down
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay: the cosine's midpoint
    assert lrs[100] == pytest.approx(0.1) and s(500) == pytest.approx(0.1)


def test_schedule_wsd_is_flat_then_linear_to_zero_at_the_end():
    from gpt2_dutch.train.schedule import make_schedule

    s = make_schedule("wsd", total_steps=100, warmup_steps=10, cooldown=0.2)
    lrs = [s(i) for i in range(101)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[10] == pytest.approx(1.0)
    assert all(x == pytest.approx(1.0) for x in lrs[10:81])  # stable at the peak until the cooldown
    assert lrs[90] == pytest.approx(0.5) and lrs[100] == 0.0  # linear to zero over the last 20 steps
    s.total_steps = 200  # a --max-time run refits the length: the cooldown moves with it
    assert s(100) == pytest.approx(1.0) and s(180) == pytest.approx(0.5)
