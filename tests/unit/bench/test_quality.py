"""`gpt2-dutch bench quality`: both recipes trained for the same budget, scored on the same held-out documents.

The figures of a 3-second run mean nothing; the test asserts that they are there, sane and consistent, that the
held-out documents were never training text, and that bad input is one line before any work."""

from __future__ import annotations

import pytest
from helpers import REPO, assert_one_line_error

from gpt2_dutch.bench.quality import split_documents


def test_heldout_documents_are_whole_seeded_and_never_trained_on():
    docs = [f"document {i}" for i in range(40)] + ["a copy"] * 20  # duplicates: a held-out copy's twins are dropped
    train, held, indices, dropped = split_documents(docs)
    assert len(held) == len(indices) == 3 and held == [docs[i] for i in indices]  # 5% of 60, whole documents
    assert not set(held) & set(train)
    assert len(train) + len(held) + dropped == len(docs)
    assert split_documents(docs) == (train, held, indices, dropped)  # seeded: the same every time
    many = [f"d{i}" for i in range(1000)]
    assert len(split_documents(many)[1]) == 50


@pytest.mark.parametrize(("args", "message"), [
    (["--max-time", "soon"], "--max-time 'soon' is not a positive duration like 90s, 30m or 2h"),
    (["--max-time", "0s"], "--max-time '0s' is not a positive duration"),
    (["--seeds", "0"], "--seeds must be between 1 and 100 (got 0)"),
    (["--ours-config", "missing.yaml"], "--ours-config missing.yaml not found"),
    (["--ours-config", "{unknown}"], "unknown setting 'learning_rat' (did you mean learning_rate?)"),
    (["--ours-config", "{fixed}"], "max_time is set by the bench"),
    (["--ours-config", "{bad_value}"], "--learning-rate must be positive"),
    (["--ablation", "missing.yaml"], "--ablation missing.yaml not found"),
    (["--ablation", "{unknown}"], "unknown setting 'learning_rat' (did you mean learning_rate?)"),
    (["--ablation", "defaults", "--ablation", "defaults"], "--ablation: two variants share a name"),
    (["--shape", "nano"], "--shape needs --tokens"),
    (["--tokens", "1e6"], "--tokens is for --shape"),
    (["--shape", "nano", "--tokens", "0"], "--tokens must be a positive number of tokens like 2e7 (got 0)"),
    (["--shape", "nano", "--tokens", "nan"], "--tokens must be a positive number of tokens"),
    (["--shape", "nano", "--tokens", "1e6", "--budgets", "2m"], "give --shape (a fixed shape and token count) or "
     "--budgets"),
    (["--shape", "nano", "--tokens", "1e6", "--max-time", "2m"], "--max-time and --shape do not go together"),
    (["--budgets", "2m", "--max-time", "2m"], "--max-time and --budgets do not go together"),
    (["--shape", "nano", "--tokens", "1e6", "--peer-lrs", "1e-3,2e-3"], "tuned over at least 3 learning rates"),
    (["--shape", "nano", "--tokens", "1e6", "--peer-lrs", "1e-3,fast,4e-3"], "'fast' is not a number"),
    (["--shape", "nano", "--tokens", "1e6", "--peer-lrs", "1e-3,-2e-3,4e-3"], "each value must be positive"),
    (["--peer-lrs", "1e-3,2e-3,3e-3"], "--peer-lrs is for --shape"),
    (["--budgets", "2m,soon"], "--budgets 'soon' is not a positive duration"),
    (["--budgets", "2m,2m"], "a budget is listed twice"),
    (["--budgets", "2m", "--ablation", "defaults"], "--ablation is for the one-budget `bench quality`, not --budgets"),
    (["--shape", "nano", "--tokens", "1e6", "--ours-config", "{sized}"], "model_size is set by --shape"),
], ids=["budget-word", "budget-zero", "seeds-zero", "config-missing", "config-unknown-key", "config-budget",
        "config-bad-value", "ablation-missing", "ablation-unknown-key", "ablation-same-name", "shape-no-tokens",
        "tokens-no-shape", "tokens-zero", "tokens-nan", "shape-and-budgets", "shape-and-max-time",
        "budgets-and-max-time", "peer-lrs-two", "peer-lrs-word", "peer-lrs-negative", "peer-lrs-no-shape",
        "budgets-word", "budgets-twice", "budgets-ablation", "shape-config-model-size"])
def test_bench_quality_bad_input(cli, tmp_path, args, message):
    files = {"{unknown}": "learning_rat: 3e-3\n", "{fixed}": "max_time: 10m\n", "{bad_value}": "learning_rate: -1\n",
             "{sized}": "model_size: tiny\n"}
    for name, text in files.items():
        (tmp_path / f"{name[1:-1]}.yaml").write_text(text)
    args = [str(tmp_path / f"{a[1:-1]}.yaml") if a in files else a for a in args]
    rc, _, err = cli("bench", "quality", *args)
    assert_one_line_error(rc, err, message)


def test_the_curve_modes_are_for_the_quality_part(cli):
    rc, _, err = cli("bench", "train", "--shape", "nano", "--tokens", "1e6")
    assert_one_line_error(rc, err, "--shape is for `gpt2-dutch bench quality`")


def test_the_example_ablation_files_are_valid_settings():
    """examples/ablation/ (the README's ablation commands): each file is a change our side accepts."""
    from gpt2_dutch.bench.quality import ours_overrides

    files = sorted((REPO / "examples" / "ablation").glob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        assert ours_overrides(str(f), "--ablation"), f.name  # a non-empty change, checked as train checks it


@pytest.mark.parametrize("seconds_per_step, expected_steps", [(0.5, 48), (30.0, 3)], ids=["fast", "slow"])
def test_the_textbooks_timing_run_times_a_tenth_of_the_budget(seconds_per_step, expected_steps, monkeypatch):
    """The textbook's cosine is fixed from its first step, so its step count comes from one timing run: after
    the first step (warm-up), a tenth of the budget (at least 3 steps), not just 3 steps, which on a shared
    machine misread the speed by up to 27% (176 s of training for a 240 s budget)."""
    from types import SimpleNamespace

    from gpt2_dutch.bench import baselines

    clock = [0.0]
    monkeypatch.setattr(baselines.time, "perf_counter", lambda: clock[0])
    timing = baselines.TimeFirstSteps(240.0)
    state, control = SimpleNamespace(global_step=0), SimpleNamespace(should_training_stop=False)
    timing.on_train_begin(None, state, control)
    while not control.should_training_stop:
        state.global_step += 1
        clock[0] += 2.0 if state.global_step == 1 else seconds_per_step
        timing.on_step_end(None, state, control)
    assert state.global_step - 1 == expected_steps  # timed steps: 24 s of 0.5 s steps; 3 of 30 s
    assert timing.seconds_per_step == pytest.approx(seconds_per_step)


def test_the_curve_modes_default_to_two_seeds_and_sort_the_peers_rates():
    from gpt2_dutch.bench import BenchConfig

    cfg = BenchConfig(part="quality", shape="nano", tokens=1e6, peer_lrs="4e-3,1e-3,2e-3,1e-3")
    assert cfg.seeds == 2 and cfg.peer_lr_values == [1e-3, 2e-3, 4e-3]
    assert BenchConfig(part="quality", budgets="2m, 4m,12m").budget_names == ["2m", "4m", "12m"]
    assert BenchConfig(part="quality", budgets="2m").seeds == 2 and BenchConfig(part="quality").seeds == 1
    assert BenchConfig(part="quality", shape="nano", tokens=1e6, seeds=3).seeds == 3
