"""data/chunks.py: the token dtype by vocabulary size, and the Arrow files and metadata as `datasets` writes them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import load_from_disk
from helpers import DOCS, all_ids, run_preprocess, write_jsonl

from gpt2_dutch.data.chunks import token_dtype


@pytest.mark.slow
def test_uint16_or_uint32_by_vocab_size(tmp_path):
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    # a GPT-2-style tokenizer with 70,000 entries: ids above 65535 must survive storage
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(ByteLevel.alphabet()))}}
    vocab.update({f"<unused{i}>": len(vocab) + i for i in range(70_000 - 1 - len(vocab))})
    vocab["en"] = 69_999  # the one merge; Dutch text is full of it
    big = tmp_path / "big"
    big.mkdir()
    (big / "vocab.json").write_text(json.dumps(vocab))
    (big / "merges.txt").write_text("#version: 0.2\ne n\n")
    path = run_preprocess(tmp_path, write_jsonl(tmp_path / "a.jsonl", DOCS * 3), big, chunk_size=8)
    m = json.loads((path / "manifest.json").read_text())
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70_000
    ids = all_ids(path, "train")
    assert ids.max() > 65535
    assert load_from_disk(str(path / "train")).features["input_ids"].feature.dtype == "uint32"


def test_the_arrow_files_and_metadata_are_what_datasets_writes(tmp_path):
    from dataclasses import asdict

    from datasets import DatasetInfo, Features, List, Value

    from gpt2_dutch.data.chunks import arrow_schema, dataset_info

    for dtype in (np.dtype(np.uint16), np.dtype(np.uint32)):
        features = Features({"input_ids": List(Value(dtype.name), length=7)})
        assert features.arrow_schema.equals(arrow_schema(dtype, 7), check_metadata=True)
        assert json.loads(json.dumps(asdict(DatasetInfo(features=features)))) == dataset_info(dtype, 7)
