"""Budget-aware defaults (train/budget.py): the batch for a budget, --model-size auto, and that runs use them."""

from __future__ import annotations

import json
import math

import pytest

from gpt2_dutch.model.presets import MODEL_PRESETS, gpt2_config
from gpt2_dutch.train import TrainConfig, train
from gpt2_dutch.train.budget import (
    MAX_OPTIMIZER_SHARE,
    MIN_STEPS,
    TOKENS_PER_PARAM,
    StepCost,
    choose_batch,
    choose_batch_in_time,
    choose_learning_rate,
    choose_model_size,
    optimal_learning_rate,
    optimal_tokens_per_step,
    params_of,
    train_flops,
)


def test_params_of_matches_the_built_model():
    from transformers import GPT2LMHeadModel

    for size in ("tiny", "nano", "pico"):
        model = GPT2LMHeadModel(gpt2_config(size, 1000, 64, 0))
        assert params_of(size, 1000, 64) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("flops", "tokens"), [(1e13, 5_220), (1e17, 106_190), (1e20, 1_017_145)])
def test_optimal_tokens_per_step_is_deepseeks_fit(flops, tokens):
    assert optimal_tokens_per_step(flops) == pytest.approx(tokens, rel=1e-3)


@pytest.mark.parametrize(("flops", "tokens", "world", "accumulation", "expected"), [
    (1e13, 1e9, 1, None, (5, 1)),  # DeepSeek's fit: 5,220 tokens -> 5 chunks of 1024
    (3e13, 1e9, 1, None, (7, 1)),
    (1e17, 1e9, 1, None, (8, 13)),  # 106k tokens = 104 chunks: micro-batches of 8 (at most), 13 of them
    (1e17, 1e9, 8, None, (7, 2)),  # eight GPUs share the step: 13 chunks each, as 2 micro-batches of 7
    (1e13, 1e9, 1, 2, (3, 2)),  # --gradient-accumulation-steps given: kept
    (1e9, 1e9, 1, None, (1, 1)),  # never below one chunk
    (1e13, 4e5, 1, None, (3, 1)),  # a few minutes on a CPU: 4e5 tokens leave 150 steps of 3 chunks, not 5
    (1e13, 1.2e5, 1, None, (1, 1)),
])
def test_choose_batch(flops, tokens, world, accumulation, expected):
    b = choose_batch(flops, tokens, 1024, world, accumulation)
    assert (b.batch_size, b.accumulation) == expected
    per_step = b.batch_size * b.accumulation * world * 1024
    target = min(optimal_tokens_per_step(flops), tokens / MIN_STEPS)
    if target > 1024:
        assert per_step == pytest.approx(target, rel=0.2)
    assert f"{per_step:,} tokens per step" in b.reason
    assert (f"at least {MIN_STEPS} steps" in b.reason) == (tokens / MIN_STEPS < optimal_tokens_per_step(flops))
    if "at least" in b.reason:
        assert f"in {tokens:.3g} tokens" in b.reason  # the run's tokens, not the step's


# DeepSeek LLM's own points: its 7B model (C = 8.4e22 at its 9.4M-token batch) trained at 4.2e-4
@pytest.mark.parametrize(("flops", "lr"), [(8.4e22, 4.25e-4), (1e18, 1.753e-3), (1e13, 7.397e-3)])
def test_optimal_learning_rate_is_deepseeks_fit(flops, lr):
    assert optimal_learning_rate(flops) == pytest.approx(lr, rel=1e-3)


@pytest.mark.parametrize("share", [4.0, 1.0, 0.25, 0.01])
def test_choose_learning_rate_scales_with_the_square_root_of_a_smaller_batch(share):
    flops = 2e13
    per_step = round(share * optimal_tokens_per_step(flops))
    lr = choose_learning_rate(flops, per_step)
    scale = min(1.0, (per_step / optimal_tokens_per_step(flops)) ** 0.5)
    assert lr.learning_rate == pytest.approx(optimal_learning_rate(flops) * scale)
    assert ("square-root rule" in lr.reason) == (share < 1) and "2e+13 FLOPs" in lr.reason
    beside_muon = choose_learning_rate(flops, per_step, muon=True)  # AdamW's rate beside Muon: 1.5x
    assert beside_muon.learning_rate == pytest.approx(1.5 * lr.learning_rate) and "beside Muon" in beside_muon.reason


@pytest.mark.parametrize(("max_tokens", "size"), [(1e6, "pico"), (2.5e9, "small"), (7e9, "medium"), (1e12, "xl")])
def test_model_size_auto_from_a_token_budget(max_tokens, size):
    choice = choose_model_size(50257, 1024, 0, "fp32", max_tokens, None, 2048, 1)
    assert choice.size == size and choice.probe_seconds == 0 and choice.tokens_per_s is None
    assert f"{max_tokens:.3g} tokens" in choice.reason


def test_model_size_auto_from_a_time_budget_measures_and_stops_early(monkeypatch):
    import gpt2_dutch.train.budget as budget

    measured = []

    def speed(size, *args, optimizer=None, **kwargs):
        measured.append((size, optimizer))
        return {"pico": 4e6, "nano": 2e6, "tiny": 1e6, "small": 2e5, "medium": 7e4}[size]  # tokens/s

    monkeypatch.setattr(budget, "measure_tokens_per_s", speed)
    monkeypatch.setattr(budget, "measure_optimizer_step_s", lambda size, *a, optimizer, **k: 0.0)
    # an hour: small sees 7.2e8 tokens (~5.8 per parameter, below 20: larger ones are not measured)
    choice = choose_model_size(50257, 1024, 0, "bf16", None, 3600.0, 2048, 1, optimizer="adamw")
    assert measured == [(s, "adamw") for s in ("pico", "nano", "tiny", "small")]  # the run's optimizer's step
    assert choice.size == "small" and choice.tokens_per_s == 2e5 and choice.optimizer_s == 0
    ratio = 2e5 * 3600 / params_of("small", 50257, 1024)
    assert ratio < TOKENS_PER_PARAM and f"{ratio:.3g} tokens per parameter" in choice.reason


def test_model_size_auto_counts_the_tokens_the_optimizers_cost_per_step_leaves(monkeypatch):
    import gpt2_dutch.train.budget as budget

    speeds = {"pico": 4e6, "nano": 2e6, "tiny": 1e6, "small": 2e5, "medium": 7e4}
    monkeypatch.setattr(budget, "measure_tokens_per_s", lambda size, *a, **k: speeds[size])
    monkeypatch.setattr(budget, "measure_optimizer_step_s", lambda size, *a, **k: 3.0 if size == "small" else 0.01)
    choice = choose_model_size(50257, 1024, 0, "bf16", None, 3600.0, 2048, 1)
    assert choice.size == "small" and choice.optimizer_s == 3.0
    # small's tokens are those of the step the batch rule picks at that cost, fewer than 2e5 tokens/s for an hour
    batch = choose_batch_in_time(train_flops("small", 50257, 1024, 1.0), 3600.0, StepCost(2e5, 3.0), None, 1024, 1,
                                 None)
    assert batch.tokens < 2e5 * 3600 * (1 - MAX_OPTIMIZER_SHARE) * 1.01
    assert f"{batch.tokens / params_of('small', 50257, 1024):.3g} tokens per parameter" in choice.reason
    assert "small 200,000 + 3 s" in choice.reason


def test_a_step_costs_its_tokens_plus_the_optimizers_fixed_seconds():
    cost = StepCost(tokens_per_s=1000.0, optimizer_s=1.0)
    assert cost.step_s(3000) == 4.0 and cost.optimizer_share(3000) == 0.25
    assert cost.tokens_in(400.0, 3000) == 100 * 3000  # 100 steps of 4 s
    assert StepCost(1000.0, 0.0).tokens_in(10.0, 512) == pytest.approx(10_000)


@pytest.mark.parametrize(("speed", "seconds", "max_tokens"), [(4e5, 1e5, None), (2e3, 200.0, None),
                                                            (2e3, 600.0, None), (5e4, 3600.0, 4e6)])
def test_a_free_optimizer_chooses_the_batch_a_token_budget_would(speed, seconds, max_tokens):
    """With no optimizer cost, a time budget is a token budget of speed x seconds (as before the optimizer was
    timed)."""
    fpt = train_flops("tiny", 32768, 512, 1.0)
    tokens = min(speed * seconds, max_tokens or math.inf)
    timed = choose_batch_in_time(fpt, seconds, StepCost(speed, 0.0), max_tokens, 512, 1, None)
    plain = choose_batch(fpt * tokens, tokens, 512, 1, None)
    assert (timed.batch_size, timed.accumulation) == (plain.batch_size, plain.accumulation)
    assert timed.tokens == pytest.approx(tokens) and timed.optimizer_share == 0
    assert "takes 0% of a step" in timed.reason


def test_the_batch_is_raised_until_the_optimizer_takes_at_most_a_quarter_of_a_step():
    # 1,000 tokens/s and 2 s per optimizer step: a quarter of a step from 6,000 tokens (12 chunks of 512); an
    # hour leaves 150 steps at up to 22,000 tokens, and DeepSeek's fit for a run of ~3e12 FLOPs is smaller
    cost, fpt = StepCost(1000.0, 2.0), 1e6
    b = choose_batch_in_time(fpt, 3600.0, cost, None, 512, 1, None)
    per_step = b.batch_size * b.accumulation * 512
    assert optimal_tokens_per_step(fpt * b.tokens) < 6000 and (b.batch_size, b.accumulation) == (6, 2)
    assert per_step == 6144 and b.optimizer_share == pytest.approx(2 / 8.144) and b.optimizer_share <= 0.25
    assert cost.optimizer_share(per_step - 512) > MAX_OPTIMIZER_SHARE  # one chunk fewer would be too many
    assert b.tokens == pytest.approx(3600 / 8.144 * 6144)
    assert b.reason.startswith("6,144 tokens per step") and "raised so that the optimizer's step, 2 s, takes 25%" in (
        b.reason) and "DeepSeek LLM's fit would be" in b.reason
    # eight GPUs: 8x the tokens per second, so 8x the tokens per step, shared out
    b8 = choose_batch_in_time(fpt, 3600.0, StepCost(8000.0, 2.0), None, 512, 8, None)
    assert b8.batch_size * b8.accumulation * 8 * 512 == 6 * 8 * 1024 and b8.optimizer_share <= MAX_OPTIMIZER_SHARE


def test_where_min_steps_and_the_optimizers_share_cannot_both_hold_the_share_wins():
    # 4 minutes at 1,000 tokens/s and 1 s per optimizer step: 150 steps allow 600 tokens each (1.6 s a step, 62%
    # of it the optimizer's); a quarter needs 3,000 tokens (6 chunks of 512), 59 steps
    cost, fpt = StepCost(1000.0, 1.0), train_flops("tiny", 32768, 512, 1.0)
    b = choose_batch_in_time(fpt, 240.0, cost, None, 512, 1, None)
    assert (b.batch_size, b.accumulation) == (6, 1) and b.optimizer_share <= MAX_OPTIMIZER_SHARE
    assert 240 / cost.step_s(3072) < MIN_STEPS
    fewer = cost.tokens_in(240.0, 600)  # what 150 steps would have seen
    assert b.tokens / fewer == pytest.approx(2.01, abs=0.01)
    assert (f"at least {MIN_STEPS} steps would allow 600 tokens per step, where it would take 62% and the run see "
            "2.0x fewer tokens: the optimizer's share wins") in b.reason
    # an optimizer slower than a 150th of the budget: not even one chunk a step leaves 150 steps
    b = choose_batch_in_time(fpt, 240.0, StepCost(1000.0, 2.0), None, 512, 1, None)
    assert b.batch_size * b.accumulation == 12 and "do not fit even at one chunk a step" in b.reason


def test_min_steps_still_bounds_a_step_whose_optimizer_is_cheap():
    # 1e5 tokens/s, 10 ms per optimizer step, 2 minutes: 150 steps of at most 79,000 tokens, below the fit
    cost, fpt = StepCost(1e5, 0.01), 1e10
    b = choose_batch_in_time(fpt, 120.0, cost, None, 1024, 1, None)
    per_step = b.batch_size * b.accumulation * 1024
    assert optimal_tokens_per_step(fpt * b.tokens) > 79_000
    # 77 chunks, as 10 micro-batches of 8: whole micro-batches round the step up a little
    assert per_step == 80 * 1024 and 120 / cost.step_s(per_step) == pytest.approx(MIN_STEPS, rel=0.04)
    assert f"at least {MIN_STEPS} steps in 120 s" in b.reason and b.optimizer_share < 0.02
    # a --max-tokens below what the time holds caps the tokens, and its 150 steps the step
    capped = choose_batch_in_time(fpt, 120.0, cost, 1.5e6, 1024, 1, None)
    assert capped.tokens == 1.5e6 and capped.batch_size * capped.accumulation == round(1.5e6 / MIN_STEPS / 1024)


def test_the_speed_probe_times_the_runs_optimizer_step_in_the_same_probe(monkeypatch):
    """One probe (one model) gives both figures: forward + backward tokens/s, and the second optimizer step's
    seconds (the first allocates the optimizer's state), on a fake clock that only the optimizer moves much."""
    import types

    import torch

    import gpt2_dutch.train.budget as budget

    now, steps = [0.0], []

    def perf_counter():
        now[0] += 0.01  # every reading: forward + backward take 0.01 s
        return now[0]

    real = budget.probe_optimizer

    def optimizer(model, kind, precision):
        opt = real(model, kind, precision)
        step = opt.step

        def timed_step(*a, **k):
            now[0] += (0.5, 0.25)[len(steps)]  # the first step is slower
            steps.append(kind)
            return step(*a, **k)

        opt.step = timed_step
        return opt

    monkeypatch.setattr(budget, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(budget, "probe_optimizer", optimizer)
    rng = torch.random.get_rng_state()
    probe = ("pico", 300, 32, 0, "bf16", 64)
    assert budget.measure_tokens_per_s(*probe, optimizer="muon") == pytest.approx(2 * 32 / 0.01)
    assert steps == ["muon", "muon"] and torch.equal(torch.random.get_rng_state(), rng)
    monkeypatch.setattr(budget, "_probe", None)  # not measured again: the same probe's figure
    assert budget.measure_optimizer_step_s(*probe, optimizer="muon") == pytest.approx(0.25 + 0.01)
    with pytest.raises(TypeError):  # taken once; another question is another probe
        budget.measure_optimizer_step_s(*probe, optimizer="muon")


def test_the_probe_builds_the_optimizer_the_run_builds():
    import torch
    from transformers import GPT2LMHeadModel

    from gpt2_dutch.train.budget import probe_optimizer
    from gpt2_dutch.train.muon import MuonAdamW

    model = GPT2LMHeadModel(gpt2_config("pico", 300, 32, 0))
    muon = probe_optimizer(model, "muon", "bf16")
    assert isinstance(muon, MuonAdamW) and muon.ns_dtype == torch.bfloat16  # a bf16 run's Newton-Schulz, as trainer.py
    assert probe_optimizer(model, "muon", "fp32").ns_dtype is None
    assert sum(len(g["params"]) for g in muon.param_groups if g["use_muon"]) == 2 * 4  # 2 blocks of 4 matrices
    adamw = probe_optimizer(model, "adamw", "fp32")
    assert type(adamw) is torch.optim.AdamW
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize(("optimizer", "fsdp", "probed"), [("muon", False, "muon"), ("adamw", False, "adamw"),
                                                          ("muon", True, "adamw")])
def test_a_time_budget_chooses_the_batch_at_what_a_step_costs_and_says_why(monkeypatch, capsys, optimizer, fsdp,
                                                                            probed):
    import gpt2_dutch.train.budget as budget
    from gpt2_dutch.train.plan import choose_for_budget

    asked = []
    monkeypatch.setattr(budget, "measure_tokens_per_s", lambda *a, optimizer, **k: asked.append(optimizer) or 1000.0)
    monkeypatch.setattr(budget, "measure_optimizer_step_s", lambda *a, optimizer, **k: asked.append(optimizer) or 2.0)
    cfg = TrainConfig(dataset_path="d", model_size="tiny", max_time="1h", optimizer=optimizer, fsdp=fsdp)
    cfg, choices = choose_for_budget(cfg, 32768, 512, 0, "bf16")
    assert asked == [probed, probed]  # the optimizer the run trains with (AdamW under --fsdp)
    left = 3600 - choices["measuring_seconds"]
    expected = choose_batch_in_time(train_flops("tiny", 32768, 512, 1.0), left, StepCost(1000.0, 2.0), None, 512,
                                    1, None)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps) == (expected.batch_size, expected.accumulation)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * 512
    assert choices["batch"]["optimizer_share"] == round(2 / (per_step / 1000 + 2), 3) <= MAX_OPTIMIZER_SHARE
    assert choices["measured_tokens_per_s"] == 1000.0 and choices["measured_optimizer_seconds"] == 2.0
    # the learning rate is sized for the tokens the hour holds at that step, the optimizer's seconds counted
    lr = choose_learning_rate(train_flops("tiny", 32768, 512, expected.tokens), per_step, muon=probed == "muon")
    assert cfg.learning_rate == pytest.approx(lr.learning_rate)
    err = capsys.readouterr().err
    assert f"batch: {cfg.batch_size} chunks x {cfg.gradient_accumulation_steps} micro-batches per step " in err
    assert "the optimizer's step, 2 s, takes" in err


def test_train_flops_counts_every_matmul_parameter():
    p = MODEL_PRESETS["tiny"]
    matmul = params_of("tiny", 1000, 64) - 64 * p.n_embd
    assert train_flops("tiny", 1000, 64, 10) == 10 * (6 * matmul + 12 * p.n_layer * p.n_embd * 64)


@pytest.mark.slow
def test_a_budgeted_run_records_its_choices_and_a_resume_keeps_them(tiny_dataset, tmp_path):
    cfg = dict(dataset_path=str(tiny_dataset), model_size="auto", max_tokens=2000, precision="fp32",
               output_dir=str(tmp_path))
    run = train(TrainConfig(**cfg))
    rc = json.loads((run / "run_config.json").read_text())
    chosen = rc["chosen_for_budget"]
    assert rc["model_size"] == chosen["model_size"]["chosen"] == "pico"  # 2000 tokens: the smallest preset
    b = choose_batch(train_flops("pico", rc["vocab_size"], rc["context"], 2000), 2000, rc["context"], 1, None)
    assert (rc["batch_size"], rc["gradient_accumulation_steps"]) == (b.batch_size, b.accumulation)
    assert rc["tokens_per_step"] == b.batch_size * b.accumulation * rc["context"]
    assert "measuring_seconds" not in chosen  # a token budget needs no measuring
    flops = train_flops("pico", rc["vocab_size"], rc["context"], 2000)
    lr = choose_learning_rate(flops, rc["tokens_per_step"], muon=True).learning_rate  # Muon: the default
    assert rc["learning_rate"] == chosen["learning_rate"]["chosen"] == pytest.approx(lr)
    assert rc["learning_rate"] != MODEL_PRESETS["pico"].learning_rate
    # the optimizer trained at that rate (the schedule's peak): the first AdamW group of the checkpoint
    import torch

    ckpt = sorted((run / "checkpoints").glob("checkpoint-*"))[-1]
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert state["param_groups"][0]["initial_lr"] == pytest.approx(lr)
    # extending the finished run with the same flags keeps its batch (its data position means the same chunks)
    more = rc["total_steps"] + 2
    train(TrainConfig(**{**cfg, "resume": str(run), "max_steps": more, "max_tokens": 10**6}))
    rc2 = json.loads((run / "run_config.json").read_text())
    assert (rc2["batch_size"], rc2["tokens_per_step"], rc2["total_steps"]) == (rc["batch_size"],
                                                                               rc["tokens_per_step"], more)
    assert rc2["learning_rate"] == rc["learning_rate"]  # and its learning rate, not the size table's


@pytest.mark.slow
def test_explicit_flags_win(tiny_dataset, tmp_path):
    run = train(TrainConfig(dataset_path=str(tiny_dataset), model_size="tiny", batch_size=3, max_tokens=400,
                            precision="fp32", output_dir=str(tmp_path)))
    rc = json.loads((run / "run_config.json").read_text())
    assert (rc["batch_size"], rc["gradient_accumulation_steps"]) == (3, 1)
    assert "chosen_for_budget" in rc and set(rc["chosen_for_budget"]) == {"learning_rate"}  # only what was open
    run = train(TrainConfig(dataset_path=str(tiny_dataset), model_size="tiny", batch_size=3, max_tokens=400,
                            learning_rate=1e-3, precision="fp32", output_dir=str(tmp_path / "b")))
    rc = json.loads((run / "run_config.json").read_text())
    assert rc["learning_rate"] == 1e-3 and "chosen_for_budget" not in rc


@pytest.mark.slow
def test_the_learning_rate_is_chosen_for_the_tokens_the_run_will_train(tiny_dataset, tmp_path):
    """A --max-steps that ends the run before its budget does sizes the learning rate's compute."""
    run = train(TrainConfig(dataset_path=str(tiny_dataset), model_size="nano", batch_size=2, max_steps=3,
                            max_tokens=1e6, precision="fp32", output_dir=str(tmp_path)))
    rc = json.loads((run / "run_config.json").read_text())
    trained = 3 * rc["tokens_per_step"]
    expected = choose_learning_rate(train_flops("nano", rc["vocab_size"], rc["context"], trained),
                                    rc["tokens_per_step"], muon=True).learning_rate
    assert rc["total_steps"] == 3 and rc["learning_rate"] == pytest.approx(expected)
    assert rc["learning_rate"] != pytest.approx(choose_learning_rate(
        train_flops("nano", rc["vocab_size"], rc["context"], 1e6), rc["tokens_per_step"], muon=True).learning_rate)
