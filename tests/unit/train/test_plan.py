"""train/plan.py: every setting of a run resolved once, into a frozen plan that the run's record and the trainer
read as they are."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.model.presets import preset
from gpt2_dutch.train.config import ADAM_BETAS, EMBEDDING_LR_SCALE, MUON_ADAMW_WEIGHT_DECAY, TrainConfig
from gpt2_dutch.train.plan import PROVISIONAL_STEPS, UNFITTED, auto_eval_chunks, make_plan

MANIFEST = {"chunk_size": 32, "vocab_size": 300,
            "splits": {"train": {"chunks": 400}, "test": {"chunks": 20, "bytes": 2600, "tokens": 640}}}


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(dataset_path=str(tmp_path / "data"), model_size="pico", batch_size=4, precision="fp32",
                output_dir=str(tmp_path / "runs"))
    base.update(kw)
    return TrainConfig(**base)


def test_a_step_limited_plan_has_every_setting_decided(tmp_path):
    plan = make_plan(_cfg(tmp_path, max_steps=250, gradient_accumulation_steps=2), MANIFEST, 400, eos_token_id=0)
    cfg = plan.cfg
    assert (plan.total_steps, plan.length_set_by, plan.step_bound) == (250, "max_steps", 250)
    assert (plan.chunks_per_step, plan.tokens_per_step) == (8, 8 * 32)
    assert (plan.eval_every, plan.save_every, plan.log_every) == (25, 25, 2)  # a tenth, a tenth, a hundredth
    assert plan.eval_chunks == auto_eval_chunks(250, 8) == 60  # 3% of the run's training chunks
    assert plan.warmup_steps == int(0.05 * 250)
    assert plan.bytes_per_token == 2600 / 640
    assert (plan.context, plan.vocab_size, plan.precision, plan.budget_s, plan.resume) == (32, 300, "fp32", None, None)
    # the defaults a new run fills in, once: the size's learning rate and the optimizer's betas and decay
    assert plan.optimizer == cfg.optimizer == "muon"
    assert cfg.learning_rate == preset("pico").learning_rate
    assert (cfg.adam_beta1, cfg.adam_beta2) == ADAM_BETAS["muon"]
    assert cfg.adamw_weight_decay == MUON_ADAMW_WEIGHT_DECAY
    assert cfg.embedding_lr_scale == EMBEDDING_LR_SCALE
    assert cfg.tie_embeddings is False and plan.model_config.tie_word_embeddings is False
    assert (plan.model_config.n_positions, plan.model_config.vocab_size) == (32, 300)


def test_the_plan_is_frozen(tmp_path):
    plan = make_plan(_cfg(tmp_path, max_steps=10), MANIFEST, 400, eos_token_id=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.total_steps = 11  # type: ignore[misc]


def test_explicit_flags_win_over_every_default(tmp_path):
    plan = make_plan(_cfg(tmp_path, max_steps=100, optimizer="adamw", learning_rate=1e-3, adam_beta1=0.8,
                          eval_every=7, save_every=9, log_every=3, eval_chunks=0, embedding_lr_scale=2.0,
                          warmup=0.2), MANIFEST, 400, eos_token_id=0)
    cfg = plan.cfg
    assert (cfg.learning_rate, cfg.adam_beta1, cfg.adam_beta2) == (1e-3, 0.8, ADAM_BETAS["adamw"][1])
    assert cfg.adamw_weight_decay is None  # adamw: --weight-decay covers every matrix
    assert (plan.eval_every, plan.save_every, plan.log_every, plan.eval_chunks) == (7, 9, 3, 0)
    assert (plan.warmup_steps, cfg.embedding_lr_scale, plan.optimizer) == (20, 2.0, "adamw")


@pytest.mark.parametrize(("limit", "expected"), [
    ({}, (12, "epochs")),  # one epoch of whole steps: 400 chunks // 4 per micro-batch // 8 micro-batches
    ({"epochs": 2.5}, (30, "epochs")),
    ({"max_tokens": 5000}, (5, "max_tokens")),  # ceil(5000 / (4 * 8 * 32))
    ({"max_tokens": 5000, "max_steps": 7}, (7, "max_steps")),
])
def test_the_length_comes_from_the_first_limit_given(tmp_path, limit, expected):
    plan = make_plan(_cfg(tmp_path, gradient_accumulation_steps=8, **limit), MANIFEST, 400, eos_token_id=0)
    assert (plan.total_steps, plan.length_set_by) == expected


def test_a_max_time_plan_waits_for_its_speed_to_fix_the_length(tmp_path):
    plan = make_plan(_cfg(tmp_path, max_time="90s", max_steps=None, learning_rate=1e-3), MANIFEST, 400, 0)
    assert (plan.total_steps, plan.length_set_by, plan.fitted_later) == (UNFITTED, "max_time", True)
    assert plan.warmup_steps == int(0.05 * PROVISIONAL_STEPS)  # until the fit: warm up as a 100-step run
    assert (plan.eval_every, plan.save_every, plan.log_every) == (UNFITTED, UNFITTED, 10)
    assert plan.budget_s == 90.0  # nothing was probed: batch and learning rate were given


@pytest.mark.parametrize(("manifest_change", "n_train", "message"), [
    ({"chunk_size": 32768}, 400, "longer than the 16384"),
    ({}, 3, "fewer than one optimizer step needs (4)"),
])
def test_a_plan_that_cannot_run_is_one_line(tmp_path, manifest_change, n_train, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_plan(_cfg(tmp_path, max_steps=5), {**MANIFEST, **manifest_change}, n_train, eos_token_id=0)


@pytest.mark.slow
def test_the_run_records_the_plan_it_trained_with(tiny_dataset, tmp_path):
    """run_config.json is the plan's cfg and decisions, as trained: nothing re-derived them later."""
    from gpt2_dutch.data.chunks import load_split, read_manifest
    from gpt2_dutch.train import train

    cfg = TrainConfig(dataset_path=str(tiny_dataset), model_size="pico", batch_size=2, precision="fp32",
                      output_dir=str(tmp_path), max_steps=3, quiet=True)
    manifest = read_manifest(tiny_dataset)
    plan = make_plan(cfg, manifest, len(load_split(tiny_dataset, "train")), eos_token_id=0)
    record = json.loads((train(cfg) / "run_config.json").read_text())
    for name, value in dataclasses.asdict(plan.cfg).items():
        assert record[name] == value, name
    assert (record["total_steps"], record["length_set_by"], record["tokens_per_step"],
            record["eval_chunks_per_evaluation"]) == (plan.total_steps, plan.length_set_by, plan.tokens_per_step,
                                                      plan.eval_chunks)


def test_a_run_that_cannot_fit_in_memory_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    import gpt2_dutch.train.plan as plan_module

    monkeypatch.setattr(plan_module, "available_memory_bytes", lambda device: 2**20)  # 1 MiB free
    with pytest.raises(UsageError) as refused:
        make_plan(_cfg(tmp_path, max_steps=5), MANIFEST, 400, eos_token_id=0)
    message = str(refused.value)
    assert message.startswith("training pico with --batch-size 4 needs about ") and "1.0 MiB is free" in message
    assert "lower --batch-size" in message and "\n" not in message
    monkeypatch.setattr(plan_module, "available_memory_bytes", lambda device: None)  # unknown: not refused
    assert make_plan(_cfg(tmp_path, max_steps=5), MANIFEST, 400, eos_token_id=0).total_steps == 5


def test_init_from_weights_that_are_not_what_their_config_says_is_refused(tmp_path):
    """config.json says pico (2 layers) and the run's shape; the weights hold one layer."""
    from transformers import GPT2LMHeadModel

    from gpt2_dutch.model.presets import gpt2_config

    config = gpt2_config("pico", 300, 32, 0, False)
    one_layer = gpt2_config("pico", 300, 32, 0, False)
    one_layer.n_layer = 1
    source = tmp_path / "source"
    GPT2LMHeadModel(one_layer).save_pretrained(source)
    (source / "config.json").write_text(config.to_json_string())
    with pytest.raises(UsageError) as refused:
        make_plan(_cfg(tmp_path, max_steps=5, init_from=str(source)), MANIFEST, 400, eos_token_id=0)
    assert "does not match the weights" in str(refused.value) and "\n" not in str(refused.value)


def test_a_budget_the_speed_probe_uses_up_is_one_line(tmp_path, monkeypatch):
    import gpt2_dutch.train.budget as budget

    monkeypatch.setattr(budget, "choose_model_size", lambda *a, **k: budget.SizeChoice("pico", 1e4, 2.5, "probed"))
    with pytest.raises(UsageError) as refused:
        make_plan(_cfg(tmp_path, model_size="auto", batch_size=None, max_time="2s"), MANIFEST, 400, eos_token_id=0)
    assert str(refused.value).startswith("--max-time 2s: measuring this machine's speed took 2.5 s of it, which "
                                         "leaves no time to train")
