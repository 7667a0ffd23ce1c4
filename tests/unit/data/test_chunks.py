"""data/chunks.py: the token dtype by vocabulary size, and the Arrow files and metadata as `datasets` writes them."""

from __future__ import annotations

import json
import os

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


def _state(split, files):
    state = json.loads((split / "state.json").read_text())
    state["_data_files"] = files
    (split / "state.json").write_text(json.dumps(state))


def _fifo(path):
    path.unlink()
    os.mkfifo(path)


SPLIT_DAMAGE = [
    pytest.param(lambda s: _fifo(s / "dataset_info.json"), "dataset_info.json is a FIFO, not a regular file",
                 id="info-fifo"),
    pytest.param(lambda s: (s / "dataset_info.json").write_text('{"features": ' + "[" * 100_000 + "}"),
                 "dataset_info.json line 1: lists or mappings nested deeper than 100", id="info-deep"),
    pytest.param(lambda s: (s / "dataset_info.json").write_text("[1, 2]"), "dataset_info.json must be a mapping",
                 id="info-not-a-mapping"),
    pytest.param(lambda s: (s / "state.json").write_text('{"_data_files": 5}'),
                 "state.json line 1: _data_files must be a list (got the number 5)", id="state-wrong-type"),
    pytest.param(lambda s: _state(s, [{"filename": "../../manifest.json"}]), "names '../../manifest.json' as a "
                 "shard, not a file of", id="state-path-out"),
    pytest.param(lambda s: _fifo(next(s.glob("data-*.arrow"))), "data-00000-of-00001.arrow is a FIFO", id="shard-fifo"),
    pytest.param(lambda s: next(s.glob("data-*.arrow")).unlink(), "data-00000-of-00001.arrow is missing",
                 id="shard-missing"),
]


@pytest.mark.parametrize(("damage", "message"), SPLIT_DAMAGE)
def test_a_split_whose_metadata_or_shards_are_not_regular_bounded_files_is_one_line(damage, message, tiny_dataset,
                                                                                     tmp_path):
    """What datasets.load_from_disk would read unbounded (state.json, dataset_info.json, the shards) is checked
    through core/reading first: never a hang on a FIFO, never a traceback."""
    import shutil
    import signal

    from gpt2_dutch.core.errors import UsageError
    from gpt2_dutch.data.chunks import load_split

    copy = tmp_path / "ds"
    shutil.copytree(tiny_dataset, copy)
    damage(copy / "train")
    signal.alarm(10)  # a FIFO opened by mistake fails the test instead of hanging it
    try:
        with pytest.raises(UsageError) as refused:
            load_split(copy, "train")
    finally:
        signal.alarm(0)
    assert message in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
    assert load_split(copy, "test") is not None  # the other split is untouched
