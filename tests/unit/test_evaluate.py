"""evaluate.py on a tiny model that has memorised the test documents: a dataset and raw files score as computed
directly, the tokenizer difference is named, and bad input to generate and evaluate is one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DOCS, assert_one_line_error, write_jsonl

from gpt2_dutch.evaluate import EvaluateConfig, evaluate

# Every test here needs `tiny_run`, a model trained for 300 steps until it knows the corpus by heart (its
# continuations are asserted), which takes longer than the whole fast suite may; test_fault_matrix.py,
# on random models, is the fast part for generate and evaluate.
pytestmark = pytest.mark.slow


def test_tokenizer_difference_names_what_decides_the_ids(loaded, tiny_dataset):
    import copy

    from transformers import AutoTokenizer

    from gpt2_dutch.evaluate import tokenizer_difference, tokenizer_spec

    ours = tokenizer_spec(loaded[1])
    theirs = tokenizer_spec(AutoTokenizer.from_pretrained(str(tiny_dataset)))  # other model_max_length, no pad
    assert tokenizer_difference(theirs, ours) is None
    fewer_merges = copy.deepcopy(ours)
    fewer_merges["merges"] = fewer_merges["merges"][:-1]
    assert tokenizer_difference(fewer_merges, ours) == (
        f"1 of the BPE merges differ (dataset {len(ours['merges']) - 1:,} merges, model {len(ours['merges']):,})")
    other_eos = copy.deepcopy(ours)
    other_eos["eos"] = ("</s>", 1)
    assert tokenizer_difference(other_eos, ours) == "end-of-text token: dataset '</s>' (id 1), model " \
        "'<|endoftext|>' (id 0)"
    swapped = copy.deepcopy(ours)
    a, b = list(swapped["vocabulary"])[10:12]
    swapped["vocabulary"][a], swapped["vocabulary"][b] = swapped["vocabulary"][b], swapped["vocabulary"][a]
    assert tokenizer_difference(swapped, ours) == "2 of the 300 vocabulary entries have other ids or are missing"
    lowercase = copy.deepcopy(ours)
    lowercase["normalizer"] = {"type": "Lowercase"}
    assert tokenizer_difference(lowercase, ours).startswith("the normalizer settings differ")


def test_evaluate_dataset_equals_direct_computation(tiny_run, tiny_dataset, loaded):
    result = evaluate(EvaluateConfig(model_path=str(tiny_run), dataset_path=str(tiny_dataset), batch_size=3))
    model, _, _ = loaded
    from datasets import load_from_disk

    ids = torch.tensor(np.asarray(load_from_disk(str(tiny_dataset / "test"))["input_ids"]).astype(np.int64))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()  # mean over every predicted token
    m = json.loads((tiny_dataset / "manifest.json").read_text())["splits"]["test"]
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(loss / math.log(2) * m["tokens"] / m["bytes"], rel=1e-5)
    assert result["tokens_per_word"] == pytest.approx(m["tokens"] / m["words"])
    assert result["tokens_scored"] == ids.shape[0] * (ids.shape[1] - 1)


def test_evaluate_raw_files_scores_each_document_after_eos(tiny_run, loaded, tmp_path):
    model, tok, _ = loaded
    long_doc = " ".join(DOCS)  # longer than the 32-token context: scored in overlapping windows
    f = write_jsonl(tmp_path / "held_out.jsonl", [DOCS[1], long_doc])
    result = evaluate(EvaluateConfig(model_path=str(tiny_run), data_files=[str(f)], batch_size=2))
    eos = tok.eos_token_id
    nats = tokens = 0.0
    for doc in (DOCS[1], long_doc):
        ids = [eos] + tok(doc)["input_ids"]
        tokens += len(ids) - 1
        for i in range(1, len(ids)):  # direct: each token given up to 32 tokens, windows starting at k*16
            start = 0 if i < 32 else ((i - 32) // 16 + 1) * 16
            with torch.no_grad():
                logits = model(torch.tensor([ids[start:i]])).logits[0, -1]
            nats -= torch.log_softmax(logits, -1)[ids[i]].item()
    assert result["tokens_scored"] == tokens
    assert result["loss"] == pytest.approx(nats / tokens, rel=1e-4)
    n_bytes = len(DOCS[1].encode()) + len(long_doc.encode())
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-4)
    assert result["documents"] == 2


@pytest.fixture
def bad_models(tmp_path: Path, tiny_run: Path) -> Path:
    """tmp_path with the directories the bad-input table names: empty/, pickled/, bert/, truncated/."""
    (tmp_path / "empty").mkdir()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_run / "final_model" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "distilbert"}))
    (bert / "model.safetensors").write_bytes(b"")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in (tiny_run / "final_model").iterdir():
        (truncated / f.name).write_bytes(f.read_bytes()[:100] if f.suffix == ".safetensors" else f.read_bytes())
    return tmp_path


BAD_INPUTS = [  # "{tmp}" is the bad_models directory, "{run}" the tiny run
    pytest.param(["generate", "--model-path", "{tmp}/nope"], "does not exist", id="generate-missing"),
    pytest.param(["generate", "--model-path", "{tmp}/empty"], "is not a model directory (no config.json)",
                 id="generate-empty-dir"),
    pytest.param(["generate", "--model-path", "{tmp}/pickled"], "has no safetensors weights (only pytorch_model.bin",
                 id="generate-pickle-only"),
    pytest.param(["generate", "--model-path", "{tmp}/bert"], "holds a 'distilbert' model, not a causal language model",
                 id="generate-not-causal"),
    pytest.param(["generate", "--model-path", "{tmp}/truncated"], "cannot load the model in",
                 id="generate-truncated-weights"),
    pytest.param(["generate", "--model-path", "{run}", "--temperature", "0"], "--temperature must be positive",
                 id="generate-temperature-zero"),
    pytest.param(["generate", "--model-path", "{run}", "--top-p", "1.5"], "--top-p must be in (0, 1]",
                 id="generate-top-p-above-1"),
    pytest.param(["generate", "--model-path", "{run}", "--prompt-file", "{tmp}/p.txt"], "prompt file",
                 id="generate-prompt-file-missing"),
    pytest.param(["evaluate", "--model-path", "{run}"], "give exactly one of --dataset-path and --data-files",
                 id="evaluate-no-data"),
    pytest.param(["evaluate", "--model-path", "{run}", "--data-files", "{tmp}/x.jsonl"], "not found",
                 id="evaluate-data-file-missing"),
    pytest.param(["evaluate", "--model-path", "{tmp}/empty", "--dataset-path", "{tmp}"], "no config.json",
                 id="evaluate-empty-model-dir"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_generate_and_evaluate_bad_inputs(args, message, bad_models, cli, tiny_run):
    rc, _, err = cli(*[a.replace("{tmp}", str(bad_models)).replace("{run}", str(tiny_run)) for a in args])
    assert_one_line_error(rc, err, message)
