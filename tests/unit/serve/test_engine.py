"""serve/engine.py: per-row sampling settings, and --max-queue bounds only the requests that must wait."""

from __future__ import annotations

import pytest


def test_max_queue_bounds_only_the_requests_that_must_wait():
    import types

    from gpt2_dutch.serve.engine import Engine, QueueFull, Sampling, Sequence

    def request(n: int) -> list[Sequence]:
        return [Sequence([1, 2], 4, Sampling(), lambda token, reason: None) for _ in range(n)]

    engine = Engine(types.SimpleNamespace(device="cpu"), eos_token_id=0, max_batch=4, max_queue=0)  # not started
    engine.submit(request(3))  # free slots: it starts at the next step, --max-queue 0 or not
    engine.submit(request(1))
    with pytest.raises(QueueFull):  # the batch is full: this one would wait, and no one may
        engine.submit(request(1))
    engine.max_queue = 3  # (the engine is not started: the first two requests still count as queued)
    engine.submit(request(2))  # waits
    with pytest.raises(QueueFull):
        engine.submit(request(1))
    assert engine.stats()["waiting"] == 3


def test_per_row_sampling_settings():
    import torch

    from gpt2_dutch.serve.engine import Sampling, new_generator, sample

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)
    rows = [Sampling(temperature=0), Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=0.01),
            Sampling(temperature=1e-30)]  # a tiny temperature is greedy, never NaN
    assert sample(logits, rows, [new_generator(i) for i in range(4)]) == [1, 1, 1, 1]
    # top_k=2 keeps tokens 1 and 3 only; their frequencies follow softmax([3, 2]) = 0.73 / 0.27
    draws = sample(logits[:1].expand(4000, -1).clone(), [Sampling(1.0, top_k=2)] * 4000,
                   [new_generator(i) for i in range(4000)])
    assert set(draws) == {1, 3} and abs(draws.count(1) / 4000 - 0.731) < 0.03
    # top_p=0.7 keeps the smallest set holding 70%: tokens 1 and 3 (0.64 + 0.24); temperature 2 flattens first
    draws = sample(logits[:1].expand(2000, -1).clone(), [Sampling(1.0, top_p=0.7)] * 2000,
                   [new_generator(i) for i in range(2000)])
    assert set(draws) == {1, 3}
    draws = sample(logits[:1].expand(2000, -1).clone(), [Sampling(2.0)] * 2000, [new_generator(i) for i in range(2000)])
    assert set(draws) == {0, 1, 2, 3}
    # a seeded row draws the same whatever shares its batch
    one = sample(logits[:1], [Sampling(1.0)], [new_generator(5)])
    mixed = sample(logits, [Sampling(0), Sampling(1.0), Sampling(1.0, top_k=2), Sampling(0.5)],
                   [None, new_generator(5), new_generator(6), new_generator(7)])
    assert mixed[1] == one[0]
