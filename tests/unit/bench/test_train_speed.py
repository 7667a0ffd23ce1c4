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


def _fake_clock(monkeypatch) -> list[float]:  # noqa: ANN001
    import types

    import gpt2_dutch.bench.baselines as baselines
    import gpt2_dutch.bench.train_speed as train_speed

    now = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: now[0])
    monkeypatch.setattr(train_speed, "time", clock)
    monkeypatch.setattr(baselines, "time", clock)  # the baseline's StepTimer
    return now


def _steps(now: list[float], n: int, step_s: float, optimizer_s: float, on_step_end=None) -> None:  # noqa: ANN001
    """`n` optimizer steps of a real torch optimizer, each `step_s` on the fake clock, `optimizer_s` of it inside
    optimizer.step (a hook of the optimizer's own runs inside the global ones)."""
    import torch

    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.1)
    opt.register_step_pre_hook(lambda *a: now.__setitem__(0, now[0] + optimizer_s))
    for _ in range(n):
        now[0] += step_s - optimizer_s
        param.grad = torch.ones(2)
        opt.step()
        if on_step_end is not None:
            on_step_end()


def test_the_optimizer_timer_times_every_step_of_any_optimizer_once_inside_its_with(monkeypatch):
    import torch

    from gpt2_dutch.bench.train_speed import OptimizerTimer

    now = _fake_clock(monkeypatch)
    _steps(now, 1, 1.0, 0.5)  # before: not counted
    with OptimizerTimer() as timer:
        _steps(now, 2, 1.0, 0.5)
        _steps(now, 3, 1.0, 0.25)  # another optimizer: counted too

        class Wrapper(torch.optim.SGD):  # a wrapper that steps an inner optimizer (as accelerate's does)
            def step(self, closure=None):  # noqa: ANN001, ANN201
                inner.step()

        param = torch.nn.Parameter(torch.zeros(1))
        inner = torch.optim.SGD([param], lr=0.1)
        inner.register_step_pre_hook(lambda *a: now.__setitem__(0, now[0] + 0.125))
        param.grad = torch.ones(1)
        Wrapper([torch.nn.Parameter(torch.zeros(1))], lr=0.1).step()  # counted once, as the outer step
    _steps(now, 1, 1.0, 0.5)  # after: not counted
    assert timer.durations == [0.5, 0.5, 0.25, 0.25, 0.25, 0.125]
    assert timer.median_s(2) == 0.25 and timer.median_s(4) == pytest.approx(0.1875)
    with pytest.raises(RuntimeError):
        timer.median_s(6)


def test_bench_train_reports_each_sides_optimizer_share(monkeypatch, tmp_path):
    """bench_train's wiring, with both trainings faked on a fake clock: each side's steps run a real optimizer
    whose step takes a known share; the baseline trains once per size, ours once per row with its --optimizer."""
    import gpt2_dutch.bench.baselines as baselines
    import gpt2_dutch.bench.train_speed as train_speed
    import gpt2_dutch.preprocess as preprocess
    import gpt2_dutch.train as train_package

    now = _fake_clock(monkeypatch)
    recipe_runs, our_runs = [], []

    def train_recipe(dataset, size, batch, steps, output_dir, timer):  # noqa: ANN001, ANN202
        recipe_runs.append(size)
        timer.on_train_begin()
        _steps(now, steps, 4.0, 0.4, timer.on_step_end)  # the baseline's AdamW: 10% of a 4 s step

    def train(cfg):  # noqa: ANN001, ANN202
        our_runs.append((cfg.model_size, cfg.optimizer, cfg.compile))
        optimizer_s = {"muon": 0.5, "adamw": 0.1}[cfg.optimizer]  # of a 2 s step
        _steps(now, cfg.max_steps, 2.0, optimizer_s)
        return cfg

    monkeypatch.setattr(baselines, "train_recipe", train_recipe)
    monkeypatch.setattr(preprocess, "preprocess", lambda cfg: tmp_path / "dataset")
    monkeypatch.setattr(train_package, "train", train, raising=False)
    monkeypatch.setattr(train_speed, "read_run_config", lambda cfg: {
        "tokens_per_step": cfg.batch_size * 512, "flops_per_token": 1e6, "parameters": 1000, "precision": "bf16",
        "optimizer": cfg.optimizer})
    monkeypatch.setattr(train_speed, "read_metrics", lambda cfg: [
        {"step": s, "tokens_per_s": cfg.batch_size * 512 / 2.0} for s in range(1, cfg.max_steps + 1)])
    limits = {"matmul_flops": {"fp32": 1e9, "bf16": 4e9}}
    out = train_speed.bench_train(tmp_path / "text.jsonl", "tok", tmp_path, False, limits)
    assert recipe_runs == ["tiny", "small"]
    assert our_runs == [("tiny", "muon", False), ("small", "muon", False), ("small", "adamw", False),
                        ("small", "muon", True)]
    assert set(out) == {"sequence", "warmup_steps", "tiny", "small", "small_adamw", "small_compile"}
    small, adamw = out["small"], out["small_adamw"]
    assert (small["optimizer"], adamw["optimizer"]) == ("muon", "adamw")
    assert small["ours_optimizer_share"] == pytest.approx(0.25) and adamw["ours_optimizer_share"] == pytest.approx(0.05)
    assert small["recipe_optimizer_share"] == adamw["recipe_optimizer_share"] == pytest.approx(0.1)
    # tokens/s and MFU as before: 4 x 512 tokens in 2 s against the baseline's 4 s; bf16 against its own peak
    assert small["ours_tokens_per_s"] == 1024 and small["speedup"] == pytest.approx(2.0)
    assert small["ours_mfu"] == pytest.approx(1024 * 1e6 / 4e9)
    assert small["recipe_mfu"] == pytest.approx(512 * 1e6 / 1e9)


def test_the_report_shows_the_optimizer_and_its_share_of_a_step():
    from gpt2_dutch.bench.report import ratios, table_rows

    entry = {"model_size": "small", "compile": False, "batch": 4, "ours_precision": "bf16", "ours_tokens_per_s": 800.0,
             "recipe_tokens_per_s": 200.0, "speedup": 4.0, "ours_mfu": 0.7, "recipe_mfu": 0.6}
    r = {"quick": False, "train": {"sequence": 512, "warmup_steps": 2,
                                   "small": {**entry, "optimizer": "muon", "ours_optimizer_share": 0.123,
                                             "recipe_optimizer_share": 0.051},
                                   "small_adamw": {**entry, "optimizer": "adamw", "ours_optimizer_share": 0.04,
                                                   "recipe_optimizer_share": 0.051},
                                   "old": {**entry, "model_size": "tiny"}}}  # a result from before: no share
    rows = table_rows(r)
    assert ("train small 4x512, tokens/s (bf16 muon vs fp32 AdamW)", "800", "200", "4.00x") in rows
    assert ("train small optimizer share of a step (muon vs AdamW)", "12%", "5%", "") in rows
    assert ("train small optimizer share of a step (adamw vs AdamW)", "4%", "5%", "") in rows
    assert ("train tiny 4x512, tokens/s (bf16 vs fp32 AdamW)", "800", "200", "4.00x") in rows
    assert not any(row[0].startswith("train tiny optimizer share") for row in rows)
    judged = ratios(r)
    assert judged["train_small_speedup"]["target"] == 2.0 and judged["train_small_adamw_speedup"]["target"] is None
