"""The model card: final_model/README.md after a tiny run (metadata = the run's metrics, the model still loads),
card_facts on the three ways to name a model, Hub datasets in the metadata, no paths in the card, --license."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import assert_one_line_error, front

from gpt2_dutch.runs.card import (
    _duration,
    card_facts,
    fertility,
    front_matter,
    gpt2_parameters,
    render_card,
    write_card,
)


@pytest.fixture
def card_run(served_run: Path) -> Path:
    """conftest's `served_run`: 4 steps, evaluated at 2 and 4, --license mit (trained once for serve and these)."""
    return served_run


def test_train_writes_a_card_whose_metadata_are_the_runs_metrics(card_run, tiny_dataset):
    final = card_run / "final_model"
    card = (final / "README.md").read_text(encoding="utf-8")
    meta = front(card)
    assert meta["language"] == ["nl"] and meta["license"] == "mit"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"gpt2", "dutch"} <= set(meta["tags"])
    assert "datasets" not in meta  # local files are no Hub dataset
    records = [json.loads(line) for line in (card_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "eval_loss" in r][-1]
    assert last["step"] == 4
    [index] = meta["model-index"]
    assert index["name"] == card_run.name
    [result] = index["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"]["type"] == "local" and result["dataset"]["name"] == "local text files: corpus.jsonl"
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert values == {"loss": round(last["eval_loss"], 4), "perplexity": round(last["eval_ppl"], 4),
                      "bits_per_byte": round(last["eval_bpb"], 4)}
    assert values["perplexity"] == pytest.approx(math.exp(last["eval_loss"]), abs=1e-3)

    # the body: how it was trained, from run_config.json, the manifest and metrics.jsonl
    rc = json.loads((card_run / "run_config.json").read_text())
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    test = manifest["splits"]["test"]
    assert f"| parameters | {rc['parameters']:,} " in card
    assert "| training tokens | 512 |" in card and "| optimizer steps | 4 |" in card  # 4 steps x 4 x 32 tokens
    assert "| learning_rate | 0.002 |" in card and "| batch_size | 4 |" in card and "| seed | 42 |" in card
    # the wall time is the one the run recorded, as the card formats it (how long it took is the machine's)
    runtime = [r["train_runtime"] for r in records if "train_runtime" in r]
    wall = card_facts(card_run)["training"]["wall_time_s"]
    assert len(runtime) == 1 and wall == round(runtime[0], 1)
    assert f"| wall time (training loop) | {_duration(wall)} |" in card
    assert "| hardware | CPU: " in card
    assert f"**{(test['tokens'] - test['documents']) / test['words']:.2f} tokens per word**" in card
    assert f"eval loss of **{last['eval_loss']:.4f} nats/token**" in card
    assert "| 4 | 512 | " in card and "| 2 | 256 | " in card  # the evaluations' table
    assert "![Train and eval loss against training tokens](loss.png)" in card
    assert (final / "loss.png").read_bytes() == (card_run / "loss.png").read_bytes()
    assert 'model_id = "path/to/final_model"' in card and "## Limitations" in card
    assert "A demonstration model" in card  # 512 tokens
    # where things lie on this machine never reaches the card
    assert str(card_run.parent) not in card and str(tiny_dataset) not in card and str(Path.home()) not in card


def test_final_model_layout_and_it_still_loads(card_run):
    final = card_run / "final_model"
    assert sorted(p.name for p in final.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "loss.png", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert not [p.name for p in card_run.iterdir() if p.name.startswith(".")]  # no staging left behind
    # checkpoints are for resuming: no card in them
    [ckpt] = list((card_run / "checkpoints").iterdir())
    assert ckpt.name == "checkpoint-4"
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= names
    assert "README.md" not in names and "loss.png" not in names
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("De trein naar Utrecht", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    out = pipeline("text-generation", model=str(final), device="cpu")("De trein", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("De trein")


def test_the_hub_reads_the_cards_evaluation_results(card_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_run / "final_model" / "README.md")  # a local file: no network
    assert card.data.language == ["nl"] and card.data.license == "mit"
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    meta = front((card_run / "final_model" / "README.md").read_text())
    assert results == {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}


def test_card_facts_are_the_same_for_run_dir_final_model_and_latest_link(card_run):
    latest = card_run.parent / "gpt2-dutch-tiny-latest"
    facts = card_facts(card_run)
    assert card_facts(card_run / "final_model") == facts == card_facts(latest)
    rc = json.loads((card_run / "run_config.json").read_text())
    assert facts["name"] == card_run.name and facts["license"] == "mit" and facts["repo_id"] is None
    assert facts["model"] == {"size": "tiny", "n_layer": 4, "n_embd": 256, "n_head": 4, "context": 32,
                              "vocab_size": rc["vocab_size"], "parameters": rc["parameters"]}
    assert facts["training"]["steps"] == 4 and facts["training"]["tokens"] == 512
    assert [r["step"] for r in facts["curve"]] == [2, 4]
    assert facts["dataset"]["kind"] == "files" and facts["dataset"]["hub_id"] is None
    assert facts["loss_curve"] == "loss.png"
    json.dumps(facts)  # plain JSON: a server can send it as is


def test_parameters_from_config_alone_match_the_model(card_run):
    config = json.loads((card_run / "final_model" / "config.json").read_text())
    assert gpt2_parameters(config) == json.loads((card_run / "run_config.json").read_text())["parameters"]


# ------------------------------------------------------------------------------------ synthetic runs (pure)


def fake_run(root: Path, source: dict, *, test_split: str = "own", evals: bool = True, **run_config) -> Path:
    """A run directory with the files the card reads (no weights: card_facts never opens them)."""
    dataset = root / "data" / "chunked_10k"
    dataset.mkdir(parents=True)
    (dataset / "manifest.json").write_text(json.dumps({
        "source": {**source, "test_split": test_split},
        "tokenizer": {"origin": "trained byte-level BPE (vocab 32000)", "vocab_size": 32000},
        "vocab_size": 32000, "chunk_size": 1024,
        "splits": {"train": {"documents": 900, "words": 1_000_000, "bytes": 6_000_000, "tokens": 1_400_900},
                   "test": {"documents": 100, "words": 100_000, "bytes": 600_000, "tokens": 150_100}}}))
    run = root / "gpt2-dutch-small-20261126-120000"
    (run / "final_model").mkdir(parents=True)
    (run / "final_model" / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 32000}))
    (run / "run_config.json").write_text(json.dumps({
        "format": "gpt2-dutch/run", "dataset_path": str(dataset), "output_dir": str(root), "model_size": "small",
        "parameters": 110_418_432, "world_size": 8, "precision": "bf16", "learning_rate": 6e-4, **run_config}))
    rows = [{"step": 100, "loss": 4.0, "tokens": 52_428_800}]
    if evals:
        rows += [{"step": 100, "eval_loss": 3.5, "eval_ppl": math.exp(3.5), "eval_bpb": 1.2, "tokens": 52_428_800},
                 {"step": 200, "eval_loss": 3.1, "eval_ppl": math.exp(3.1), "eval_bpb": 1.05, "tokens": 104_857_600}]
    rows += [{"step": 200, "train_runtime": 3600.0, "tokens": 104_857_600}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 20')  # a cut line
    return run


HUB = {"type": "hub", "dataset": "BramVanroy/wikipedia_culturax_dutch", "config": "10k", "streaming": False}


def test_a_hub_dataset_is_named_in_the_metadata(tmp_path):
    run = fake_run(tmp_path, HUB, push_to_hub="someone/gpt2-dutch-small")
    facts = card_facts(run, hardware="NVIDIA H100 80GB HBM3")
    meta = front(render_card(facts))
    assert meta["datasets"] == ["BramVanroy/wikipedia_culturax_dutch"]
    data = meta["model-index"][0]["results"][0]["dataset"]
    assert data["type"] == "BramVanroy/wikipedia_culturax_dutch" and data["config"] == "10k"
    assert data["split"] == "test"
    assert {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]} == {
        "loss": 3.1, "perplexity": round(math.exp(3.1), 4), "bits_per_byte": 1.05}
    assert facts["training"]["hardware"] == "8 x NVIDIA H100 80GB HBM3"
    assert facts["training"]["wall_time_s"] == 3600.0 and facts["training"]["tokens"] == 104_857_600
    assert facts["tokenizer"]["fertility"] == pytest.approx(1.5) and facts["tokenizer"]["fertility_train"] == 1.4
    card = render_card(facts)
    assert 'model_id = "someone/gpt2-dutch-small"' in card and "| wall time (training loop) | 60.0 min |" in card
    assert "| hardware | 8 x NVIDIA H100 80GB HBM3 |" in card and "A demonstration model" not in card
    assert "104,857,600 (104.9M)" in card and "110,418,432 (110.4M)" in card


def test_durations_are_said_in_seconds_minutes_or_hours():
    assert [_duration(s) for s in (None, 0.4, 1.2, 119.4, 120, 5400, 7200)] == [
        "not recorded", "0 s", "1 s", "119 s", "2.0 min", "90.0 min", "2.0 h"]


def test_local_files_are_named_without_their_paths(tmp_path):
    home = "/home/someone/secret-project"
    source = {"type": "files", "files": [f"{home}/part-{i}.jsonl" for i in range(7)], "text_column": "text"}
    run = fake_run(tmp_path, source, test_split="carved 0.1 of train (seed 42)")
    rc = json.loads((run / "run_config.json").read_text())
    rc["init_from"] = f"{home}/runs/gpt2-dutch-small-base/final_model"
    (run / "run_config.json").write_text(json.dumps(rc))
    card = render_card(card_facts(run))
    assert "/home" not in card and "secret-project" not in card and str(tmp_path) not in card
    assert "local text files: part-0.jsonl, part-1.jsonl, part-2.jsonl, part-3.jsonl, part-4.jsonl and 2 more" in card
    assert "10% of the documents, held out from training (seed 42)" in card
    assert "| initialized from | the weights of final_model |" in card
    assert "datasets" not in front(card)


def test_a_run_without_evaluations_or_records_still_gets_a_card(tmp_path):
    run = fake_run(tmp_path, HUB, evals=False)
    facts = card_facts(run)
    assert facts["eval"] is None and facts["curve"] == []
    meta = front(render_card(facts))
    assert "model-index" not in meta and meta["datasets"] == ["BramVanroy/wikipedia_culturax_dutch"]
    # a final_model copied away from its run: only config.json to go on
    bare = tmp_path / "copied"
    bare.mkdir()
    (bare / "config.json").write_text((run / "final_model" / "config.json").read_text())
    facts = card_facts(bare)
    assert facts["name"] == "copied" and facts["dataset"] is None and facts["tokenizer"] is None
    assert facts["model"]["parameters"] == gpt2_parameters(json.loads((bare / "config.json").read_text()))
    card = render_card(facts)
    assert front(card)["license"] == "apache-2.0" and "fertility not recorded" in card


def test_fertility_leaves_out_the_end_of_text_tokens():
    assert fertility({"documents": 10, "words": 100, "tokens": 160}) == 1.5
    assert fertility({"documents": 0, "words": 0, "tokens": 0}) is None and fertility(None) is None


def test_a_card_that_cannot_be_rendered_never_costs_the_model(tmp_path, monkeypatch, capsys):
    import gpt2_dutch.runs.card as mc

    run = fake_run(tmp_path, HUB)

    def broken(facts):
        raise KeyError("n_layer")

    monkeypatch.setattr(mc, "render_card", broken)
    path = write_card(run / "final_model", run)
    assert "could not be written in full" in capsys.readouterr().err
    meta = front(path.read_text())
    assert meta["language"] == ["nl"] and meta["library_name"] == "transformers"


def test_front_matter_is_valid_yaml_for_awkward_names(tmp_path):
    run = fake_run(tmp_path, {"type": "files", "files": ["a: b #c.jsonl", "'quoted'.txt"]})
    meta = front(render_card(card_facts(run)))
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "local text files: a: b #c.jsonl, 'quoted'.txt"
    assert front_matter(card_facts(run))["model-index"] == meta["model-index"]


BAD_LICENSES = [pytest.param(v, id=v or "empty") for v in ["", "Apache 2.0", "mit;rm", "-x"]]


@pytest.mark.parametrize("value", BAD_LICENSES)
def test_a_bad_license_is_one_line(value, tiny_dataset, tmp_path, cli):
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, "--output-dir", tmp_path, f"--license={value}")
    assert_one_line_error(rc, err, "is not a license identifier")
    assert not (tmp_path / "gpt2-dutch-small-latest").exists() and not list(tmp_path.glob("gpt2-dutch-*"))
