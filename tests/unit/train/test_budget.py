"""Budget-aware defaults (train/budget.py): the batch for a budget, --model-size auto, and that runs use them."""

from __future__ import annotations

import json

import pytest

from gpt2_dutch.model.presets import MODEL_PRESETS, gpt2_config
from gpt2_dutch.train import TrainConfig, train
from gpt2_dutch.train.budget import (
    MIN_STEPS,
    TOKENS_PER_PARAM,
    choose_batch,
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

    def speed(size, *args, **kwargs):
        measured.append(size)
        return {"pico": 4e6, "nano": 2e6, "tiny": 1e6, "small": 2e5, "medium": 7e4}[size]  # tokens/s

    monkeypatch.setattr(budget, "measure_tokens_per_s", speed)
    # an hour: small sees 7.2e8 tokens (~5.8 per parameter, below 20: larger ones are not measured)
    choice = choose_model_size(50257, 1024, 0, "bf16", None, 3600.0, 2048, 1)
    assert measured == ["pico", "nano", "tiny", "small"]
    assert choice.size == "small" and choice.tokens_per_s == 2e5
    ratio = 2e5 * 3600 / params_of("small", 50257, 1024)
    assert ratio < TOKENS_PER_PARAM and f"{ratio:.3g} tokens per parameter" in choice.reason


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
