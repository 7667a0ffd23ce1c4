"""bench/curves.py: where the snapshots go, when ours first reaches the peer's final figure (linear between the
points), the mean over seeds, the ratios judged against their targets, and the report's section; on made-up
curves, so every figure is known."""

from __future__ import annotations

import pytest

from gpt2_dutch.bench.curves import (
    extra_ratios,
    mean_ratio,
    ratio_text,
    reach,
    section,
    snapshot_steps,
    tokens_to_reach,
)


@pytest.mark.parametrize(("total", "points", "expected"), [
    (800, 8, [100, 200, 300, 400, 500, 600, 700, 800]),
    (803, 8, [100, 200, 300, 400, 500, 600, 700, 803]),  # the last point is the final step, a little further
    (5, 8, [1, 2, 3, 4, 5]),  # fewer steps than points: every step
    (1, 8, [1]),
], ids=["even", "remainder", "short", "one-step"])
def test_snapshot_steps_are_even_and_end_on_the_final_step(total, points, expected):
    assert snapshot_steps(total, points) == expected


def test_tokens_to_reach_interpolates_between_the_points_around_the_first_crossing():
    curve = [(100, 3.0), (200, 2.5), (300, 2.0)]
    assert tokens_to_reach(curve, 2.25) == (pytest.approx(250.0), "interpolated")
    assert tokens_to_reach(curve, 2.9) == (pytest.approx(120.0), "interpolated")
    assert tokens_to_reach(curve, 2.5) == (pytest.approx(200.0), "interpolated")  # reaching = at or below
    assert tokens_to_reach(list(reversed(curve)), 2.25) == (pytest.approx(250.0), "interpolated")  # order-free


def test_tokens_to_reach_takes_the_first_crossing_of_a_curve_that_rises_again():
    # overfitting: it dips below the target, rises above it, and dips again; the first crossing counts
    curve = [(100, 3.0), (200, 2.4), (300, 2.6), (400, 2.2)]
    tokens, how = tokens_to_reach(curve, 2.5)
    assert how == "interpolated" and tokens == pytest.approx(100 + 0.5 / 0.6 * 100)


def test_tokens_to_reach_at_the_first_point_or_never():
    curve = [(100, 3.0), (200, 2.5)]
    assert tokens_to_reach(curve, 3.5) == (100, "at_first_point")  # an upper bound: nothing scored before it
    assert tokens_to_reach(curve, 2.0) == (None, "never")


def test_reach_gives_the_fraction_of_the_run_and_the_mean_needs_every_seed():
    ours = [{"tokens": 1000, "bits_per_byte": 2.6}, {"tokens": 2000, "bits_per_byte": 2.2},
            {"tokens": 4000, "bits_per_byte": 2.0}]
    r = reach(ours, 2.4, 4000)
    assert r["tokens"] == pytest.approx(1500.0) and r["ratio"] == pytest.approx(0.375) and r["how"] == "interpolated"
    assert r["target_bits_per_byte"] == 2.4 and ratio_text(r) == "0.375"
    never = reach(ours, 1.9, 4000)
    assert never["ratio"] is None and ratio_text(never) == "never reached"
    first = reach(ours, 2.7, 4000)
    assert first["ratio"] == pytest.approx(0.25) and ratio_text(first) == "<= 0.250"
    assert mean_ratio([r, first]) == pytest.approx((0.375 + 0.25) / 2)
    assert mean_ratio([r, never]) is None


def _sample_efficiency(ratios: list[float | None]) -> dict:
    runs = []
    for seed, ratio in zip((42, 43), ratios, strict=False):
        curve = [{"step": 10, "tokens": 1000, "bits_per_byte": 2.5}, {"step": 20, "tokens": 2000, "bits_per_byte": 2.1}]
        runs.append({"seed": seed, "ours": {"curve": curve, "final_bits_per_byte": 2.1},
                     "peer": {"curve": curve, "final_bits_per_byte": 2.3},
                     "reach": {"target_bits_per_byte": 2.3, "tokens": None if ratio is None else ratio * 2000,
                               "how": "never" if ratio is None else "interpolated", "ratio": ratio}})
    return {"shape": "nano", "tokens": 2000, "points": [10, 20], "heldout": {"documents": 3}, "runs": runs,
            "ours": {"settings": {"optimizer": "muon"}}, "tokens_ratio": mean_ratio([r["reach"] for r in runs]),
            "peer": {"name": "tuned AdamW Trainer", "learning_rate": 2e-3, "settings": {"optimizer": "AdamW"},
                     "lr_sweep": {"seed": 42, "learning_rates": [1e-3, 2e-3, 4e-3],
                                  "final_bits_per_byte": [2.4, 2.3, 2.35], "chosen": 2e-3}}}


def test_the_token_ratio_is_judged_against_half_unless_quick():
    r = {"quick": False, "sample_efficiency": _sample_efficiency([0.4, 0.6])}
    assert extra_ratios(r) == {"quality_nano_tokens_to_peer": {"value": pytest.approx(0.5), "target": 0.5,
                                                               "met": True}}
    r = {"quick": False, "sample_efficiency": _sample_efficiency([0.5, 0.7])}
    assert extra_ratios(r)["quality_nano_tokens_to_peer"]["met"] is False
    r = {"quick": True, "sample_efficiency": _sample_efficiency([0.4, 0.6])}
    assert extra_ratios(r)["quality_nano_tokens_to_peer"]["target"] is None
    r = {"quick": False, "sample_efficiency": _sample_efficiency([0.4, None])}
    assert extra_ratios(r) == {}  # a seed never reached the peer: no figure to judge (the section says so)


def test_each_budgets_ratio_is_judged_against_the_one_budget_target():
    budgets = {"budget_names": ["2m", "4m"], "budgets": [{"ratio": 0.79}, {"ratio": 0.81}]}
    r = extra_ratios({"quick": False, "quality_budgets": budgets})
    assert {k: v["met"] for k, v in r.items()} == {"quality_bpb_ratio_2m": True, "quality_bpb_ratio_4m": False}
    assert r["quality_bpb_ratio_2m"]["target"] == 0.80


def test_the_section_shows_each_seed_the_mean_and_the_sweep():
    text = section({"sample_efficiency": {**_sample_efficiency([0.4, None]), "plot": "/x/bench_curves.png"}})
    assert "| nano, seed 42: tokens until ours reaches the peer's final / 0.002M | 0.0008M |  | 0.400 |" in text
    assert "| nano, seed 43: tokens until ours reaches the peer's final / 0.002M | - |  | never reached |" in text
    assert "mean of 2 seeds |  |  | never reached (a seed) |" in text
    assert "0.001: 2.4000, 0.002: 2.3000, 0.004: 2.3500 | best 0.002 |" in text
    assert text.rstrip().endswith("Plot: bench_curves.png") and "widen" not in text
    se = _sample_efficiency([0.4])
    se["peer"]["lr_sweep"]["at_edge"] = True  # the best rate at an end of the sweep: the peer may not be tuned
    assert "best 0.002 (an end of the sweep: widen --peer-lrs) |" in section({"sample_efficiency": se})


def _fake_budgets(tmp_path, monkeypatch) -> dict:
    """quality.bench_quality_budgets at 2m and 4m, two seeds, with training and scoring faked: each side's bits per
    byte falls with its budget (ours 1.6, the textbook 2.0 at 2 minutes, half that at 4)."""
    from gpt2_dutch.bench import quality

    prepared = []
    monkeypatch.setattr(quality, "prepare", lambda *a, **k: prepared.append(a) or {
        "root": tmp_path, "dataset": tmp_path, "heldout_file": tmp_path, "tokenizer": "t", "baseline_data": None,
        "report": {"heldout": {"documents": 3}, "train_text": {"documents": 30}, "tokenizer": "t"}})
    side = {"steps": 10, "tokens": 1e4, "parameters": 1e6}
    monkeypatch.setattr(quality, "_ours", lambda d, budget_s, seed, o, out: {
        **side, "train_seconds": budget_s, "model": f"ours {budget_s}", "settings": {"model_size": "pico"}})
    monkeypatch.setattr(quality, "_baseline", lambda d, t, budget_s, seed, out: {
        **side, "train_seconds": budget_s, "model": f"base {budget_s}"})
    monkeypatch.setattr(quality, "_score", lambda model, heldout: {
        "bits_per_byte": (1.6 if model.startswith("ours") else 2.0) * 120 / float(model.split()[1]), "loss": 1.0,
        "tokens_scored": 100})
    monkeypatch.setattr(quality, "_free_memory", lambda: None)
    b = quality.bench_quality_budgets(tmp_path, None, tmp_path, False, ["2m", "4m"], 2, None, {})
    assert len(prepared) == 1  # one text, one tokenizer, one dataset for every budget
    return b


def test_budgets_run_the_one_budget_comparison_at_each_budget(tmp_path, monkeypatch):
    b = _fake_budgets(tmp_path, monkeypatch)
    assert b["budget_names"] == ["2m", "4m"] and [q["budget_s"] for q in b["budgets"]] == [120.0, 240.0]
    assert b["ratios"] == [pytest.approx(0.8), pytest.approx(0.8)]
    assert [q["ours_bits_per_byte"] for q in b["budgets"]] == [pytest.approx(1.6), pytest.approx(0.8)]
    assert [r["seed"] for r in b["budgets"][1]["runs"]] == [42, 43]
    r = {"quick": False, "quality_budgets": b}
    assert set(extra_ratios(r)) == {"quality_bpb_ratio_2m", "quality_bpb_ratio_4m"}
    text = section(r)
    assert text.startswith("Quality at budgets 2m, 4m")
    assert "| 2m: quality: held-out bits per byte after 2 min, seed 43 | 1.6000 | 2.0000 | 0.800 |" in text
    assert "| 4m: quality: held-out bits per byte, mean of 2 seeds | 0.8000 | 1.0000 | 0.800 |" in text


def test_the_budgets_section_is_appended_to_the_report_with_its_plot(tmp_path, monkeypatch):
    from gpt2_dutch.bench.curves import write_section

    r = {"quick": False, "quality_budgets": _fake_budgets(tmp_path, monkeypatch)}
    md, png = tmp_path / "bench.md", tmp_path / "bench_curves.png"
    md.write_text("the report\n")
    write_section(r, md, png)
    text = md.read_text()
    assert text.startswith("the report\n\nQuality at budgets 2m, 4m") and text.endswith("Plot: bench_curves.png\n")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
