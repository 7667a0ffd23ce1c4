"""preprocess: formats, EOS placement, chunk boundaries, manifest counts, dtype, streaming, bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import load_from_disk
from helpers import DOCS, DUTCH_CORPUS, all_ids, assert_one_line_error, make_hub_like, run_preprocess, write_jsonl
from transformers import AutoTokenizer

from gpt2_dutch.data.tokenizer import load_tokenizer
from gpt2_dutch.preprocess import PreprocessConfig, preprocess


def expected_stream(tokenizer_dir: Path, docs: list[str]) -> list[int]:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stream: list[int] = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return stream


def test_eos_and_chunk_boundaries_token_by_token(tmp_path, small_tokenizer):
    docs = DOCS[:3]
    path = run_preprocess(tmp_path, write_jsonl(tmp_path / "a.jsonl", docs), small_tokenizer,
                          chunk_size=7, test_split=0.5, seed=3)
    manifest = json.loads((path / "manifest.json").read_text())
    # seed 3 with fraction 0.5 holds out exactly these documents (random.Random(3) draws)
    import random

    rng = random.Random(3)
    held = [rng.random() < 0.5 for _ in docs]
    train_docs = [d for d, h in zip(docs, held, strict=True) if not h]
    stream = expected_stream(small_tokenizer, train_docs)
    n_chunks = len(stream) // 7
    chunks = all_ids(path, "train")
    assert chunks.shape == (n_chunks, 7)
    assert chunks.flatten().tolist() == stream[: n_chunks * 7]
    eos = AutoTokenizer.from_pretrained(str(path)).eos_token_id
    # one EOS after every document, at exactly the positions where documents end
    ends = np.cumsum([len(expected_stream(small_tokenizer, [d])) for d in train_docs]) - 1
    flat = chunks.flatten()
    assert [i for i, t in enumerate(flat) if t == eos] == [e for e in ends if e < len(flat)]
    assert manifest["splits"]["train"]["dropped_tokens"] == len(stream) - n_chunks * 7


def test_decoding_chunks_gives_back_the_source_text(tmp_path, small_tokenizer, docs):
    path = run_preprocess(tmp_path, write_jsonl(tmp_path / "a.jsonl", docs), small_tokenizer,
                          chunk_size=16, test_split=0.25)
    tok = AutoTokenizer.from_pretrained(str(path))
    manifest = json.loads((path / "manifest.json").read_text())
    dropped = manifest["splits"]["train"]["dropped_tokens"]
    # re-derive which documents went to train, then decode chunks (+ the dropped tail) back to text
    import random

    rng = random.Random(42)
    train_docs = [d for d in docs if not rng.random() < 0.25]
    stream = expected_stream(small_tokenizer, train_docs)
    flat = all_ids(path, "train").flatten().tolist()
    assert flat + stream[len(stream) - dropped:] == stream
    text = tok.decode(flat + stream[len(stream) - dropped:])
    assert text == "".join(d + "<|endoftext|>" for d in train_docs)


def test_manifest_counts_match_an_independent_count(tmp_path, small_tokenizer, corpus):
    path = run_preprocess(tmp_path, corpus, small_tokenizer, chunk_size=32)
    m = json.loads((path / "manifest.json").read_text())
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tr, te = m["splits"]["train"], m["splits"]["test"]
    assert tr["documents"] + te["documents"] == len(docs)
    assert tr["words"] + te["words"] == sum(len(d.split()) for d in docs)
    assert tr["bytes"] + te["bytes"] == sum(len(d.encode()) for d in docs)
    assert tr["tokens"] + te["tokens"] == len(expected_stream(small_tokenizer, docs))
    for split, s in m["splits"].items():
        n_rows = len(load_from_disk(str(path / split)))
        assert s["chunks"] == n_rows == s["tokens"] // 32
        assert s["dropped_tokens"] == s["tokens"] % 32
    assert m["chunk_size"] == 32 and m["dtype"] == "uint16" and m["vocab_size"] == 300
    assert m["source"]["type"] == "files" and "created" in m and "package_version" in m
    # the saved tokenizer and the dataset open with plain transformers / datasets
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    ds = load_from_disk(str(path))
    assert set(ds) == {"train", "test"} and ds["train"].features["input_ids"].feature.dtype == "uint16"
    assert not list((tmp_path / "out").glob(".*")), "no temporary directories left behind"


@pytest.mark.slow
def test_every_file_format_gives_the_same_chunks(tmp_path, small_tokenizer):
    docs = DOCS * 4
    d = tmp_path / "in"
    d.mkdir()
    jsonl = write_jsonl(d / "a.jsonl", docs)
    gz = d / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    arr = d / "c.json"
    arr.write_text(json.dumps([{"text": t} for t in docs], ensure_ascii=False))
    parquet = d / "d.parquet"
    pq.write_table(pa.table({"text": docs, "url": ["x"] * len(docs)}), parquet)
    txt = d / "e.txt"
    txt.write_text("\n\n".join(docs) + "\n")
    txtgz = d / "f.txt.gz"
    txtgz.write_bytes(gzip.compress(txt.read_bytes()))
    results = []
    for i, f in enumerate([jsonl, gz, arr, parquet, txt, txtgz]):
        out = run_preprocess(tmp_path / str(i), f, small_tokenizer, chunk_size=16)
        results.append((all_ids(out, "train"), all_ids(out, "test")))
    for train, test in results[1:]:
        assert np.array_equal(train, results[0][0]) and np.array_equal(test, results[0][1])


def test_txt_sample_by_line_and_document(tmp_path, small_tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("Eerste regel.\nTweede regel.\n\nDerde regel.\n")
    from gpt2_dutch.data.sources import iter_file_texts

    assert list(iter_file_texts(txt, sample_by="line")) == ["Eerste regel.", "Tweede regel.", "Derde regel."]
    assert list(iter_file_texts(txt, sample_by="paragraph")) == ["Eerste regel.\nTweede regel.", "Derde regel."]
    assert list(iter_file_texts(txt, sample_by="document")) == ["Eerste regel.\nTweede regel.\n\nDerde regel."]


def test_offline_gpt2_tokenizer_gives_gpt2_ids(gpt2_dir):
    tok = load_tokenizer(str(gpt2_dir))
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == 50256 and tok.eos_token == "<|endoftext|>"


def test_reuse_tokenizer_of_a_dataset(tmp_path, corpus):
    first = run_preprocess(tmp_path / "a", corpus, None, vocab_size=280, chunk_size=16)
    second = run_preprocess(tmp_path / "b", corpus, first, chunk_size=16)
    assert np.array_equal(all_ids(first, "train"), all_ids(second, "train"))
    assert json.loads((second / "manifest.json").read_text())["tokenizer"]["origin"] == str(first)


def test_both_encoders_write_identical_chunks(tmp_path, corpus, small_tokenizer):
    fast = run_preprocess(tmp_path / "a", corpus, small_tokenizer, chunk_size=16)
    plain = run_preprocess(tmp_path / "b", corpus, small_tokenizer, chunk_size=16, encoder="tokenizers")
    for split in ("train", "test"):
        assert np.array_equal(all_ids(fast, split), all_ids(plain, split))
    assert [json.loads((p / "manifest.json").read_text())["tokenizer"]["encoded_with"] for p in (fast, plain)] == [
        "tiktoken", "tokenizers"]


@pytest.mark.slow
@pytest.mark.parametrize("own_test_is_big", [True, False])
def test_streaming_and_in_memory_give_identical_chunks(tmp_path, small_tokenizer, own_test_is_big, capsys):
    hub = make_hub_like(tmp_path / "hub", DOCS * 2 if own_test_is_big else DOCS[:1])
    outs = []
    for streaming in (False, True):
        cfg = PreprocessConfig(dataset_name=str(hub), dataset_size="10k", tokenizer=str(small_tokenizer),
                               chunk_size=64, streaming=streaming, output_dir=str(tmp_path / str(streaming)))
        outs.append(preprocess(cfg))
    for split in ("train", "test"):
        assert np.array_equal(all_ids(outs[0], split), all_ids(outs[1], split))
    m = json.loads((outs[1] / "manifest.json").read_text())
    if own_test_is_big:  # the config's own test split is used as is
        assert m["source"]["test_split"] == "own" and m["splits"]["test"]["documents"] == 24
    else:  # too small for one chunk: carved from train, with a notice
        assert m["source"]["test_split"].startswith("carved 0.1")
        assert "fewer than one 64-token chunk; carving 10%" in capsys.readouterr().err


def test_overwrite_replaces_existing_output(tmp_path, small_tokenizer, corpus, cli):
    args = ["preprocess", "--data-files", corpus, "--tokenizer", small_tokenizer, "--output-dir",
            tmp_path / "o", "--chunk-size", "16", "--name", "x"]
    assert cli(*args)[0] == 0
    rc, _, err = cli(*args)
    assert rc == 2 and "already exists; pass --overwrite" in err
    rc, out, _ = cli(*args, "--overwrite", "--chunk-size", "8")
    assert rc == 0 and "8-token chunks" in out
    assert json.loads((tmp_path / "o" / "x" / "manifest.json").read_text())["chunk_size"] == 8
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x"]


BAD_INPUTS = [
    (["--data-files", "{tmp}/missing.jsonl"], "missing.jsonl not found"),
    (["--data-files", "{tmp}/bad.csv"], "unknown file type; use .jsonl, .json, .parquet or .txt"),
    (["--data-files", "{tmp}/broken.jsonl"], "broken.jsonl:2: not valid JSON"),
    (["--data-files", "{tmp}/corpus.jsonl", "--text-column", "body"], "no 'body' field (it has: text)"),
    (["--data-files", "{tmp}/empty.jsonl"], "no text found"),
    (["--data-files", "{tmp}/latin1.txt"], "not UTF-8 text"),
    (["--data-files", "{tmp}/corrupt.jsonl.gz"], "cannot read it"),
    (["--dataset-size", "3k"], "unknown --dataset-size '3k'; valid sizes: 10k, 100k, 1M"),
    (["--data-files", "{tmp}/corpus.jsonl", "--chunk-size", "1"], "--chunk-size must be at least 2"),
    (["--data-files", "{tmp}/corpus.jsonl", "--chunk-size", "99999999"], "absurdly large"),
    (["--data-files", "{tmp}/corpus.jsonl", "--vocab-size", "100"], "--vocab-size 100 is too small"),
    (["--data-files", "{tmp}/corpus.jsonl", "--test-split", "0.7"], "--test-split must be in (0, 0.5]"),
    (["--data-files", "{tmp}/corpus.jsonl", "--test-split", "0"], "--test-split must be in (0, 0.5]"),
    (["--data-files", "{tmp}/short.jsonl", "--chunk-size", "512"], "the train split has only"),
    (["--data-files", "{tmp}/corpus.jsonl", "--tokenizer", "{tmp}"], "holds no tokenizer"),
    (["--data-files", "{tmp}/corpus.jsonl", "--encoder", "fast"], "invalid choice: 'fast'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, cli, args, message, small_tokenizer):
    write_jsonl(tmp_path / "corpus.jsonl", DOCS * 8)
    (tmp_path / "bad.csv").write_text("text\nhallo\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "goed"}\n{"text": kapot}\n')
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    (tmp_path / "latin1.txt").write_bytes("Café in België".encode("latin-1"))
    (tmp_path / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    write_jsonl(tmp_path / "short.jsonl", DOCS[:2])
    out = tmp_path / "out"
    full = [a.format(tmp=tmp_path) for a in args]
    if "--tokenizer" not in full and "--vocab-size" not in full:
        full += ["--tokenizer", str(small_tokenizer)]
    rc, _, err = cli("preprocess", *full, "--output-dir", out)
    assert_one_line_error(rc, err, message)
    assert not out.exists() or not any(out.iterdir()), "nothing half-written"


@pytest.mark.slow
def test_hub_unreachable_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "gpt2_dutch", "preprocess", "--dataset-size", "10k",
                        "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert_one_line_error(r.returncode, r.stderr, "cannot load BramVanroy/wikipedia_culturax_dutch config '10k'")
    assert "--data-files" in r.stderr
    assert not (tmp_path / "out" / "chunked_10k").exists()


@pytest.mark.slow
@pytest.mark.skipif(not DUTCH_CORPUS.is_file(), reason="../shared/data/dutch is not present")
def test_real_corpus_with_trained_dutch_bpe(tmp_path):
    path = run_preprocess(tmp_path, DUTCH_CORPUS, None, vocab_size=8192)
    m = json.loads((path / "manifest.json").read_text())
    words = m["splits"]["train"]["words"] + m["splits"]["test"]["words"]
    tokens = m["splits"]["train"]["tokens"] + m["splits"]["test"]["tokens"]
    assert m["splits"]["train"]["documents"] + m["splits"]["test"]["documents"] == 4252
    assert words == 2_270_239
    assert 1.2 < tokens / words < 1.7  # English GPT-2 BPE needs ~2.4 tokens per Dutch word


def test_sample_is_its_own_switch_and_dataset_size_builtin_its_old_spelling(capsys):
    from gpt2_dutch.__main__ import command_parser

    new = PreprocessConfig(sample=True)
    assert capsys.readouterr().err == ""
    old = PreprocessConfig(dataset_size="builtin")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dataset-size builtin is deprecated, use --sample" in err
    assert (old.sample, old.dataset_size, old.name, old.streaming) == (new.sample, None, "chunked_builtin", False)
    help_text = command_parser("preprocess").format_help()
    assert "--sample" in help_text and "builtin" not in help_text
    with pytest.raises(Exception, match="give one of --sample, --dataset-size or --data-files"):
        PreprocessConfig(sample=True, dataset_size="10k")
