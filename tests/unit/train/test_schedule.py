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


def test_schedule_wsd_with_a_long_cooldown_and_its_flag():
    """--cooldown 0.6 (modded-nanogpt's cooldown_frac; nanochat's warmdown_ratio is 0.65): the peak until 40% of
    the run, then linear to 0; a --max-time refit may still change the length only before the cooldown."""
    from gpt2_dutch.train.config import TrainConfig
    from gpt2_dutch.train.schedule import make_schedule

    cooldown = TrainConfig(dataset_path="-", cooldown=0.6).cooldown
    s = make_schedule("wsd", total_steps=100, warmup_steps=5, cooldown=cooldown)
    assert s(39) == 1.0 and s(40) == pytest.approx(1.0) and s(70) == pytest.approx(0.5) and s(100) == 0.0
    assert s.can_change_length(30, 120) and not s.can_change_length(45, 120)
