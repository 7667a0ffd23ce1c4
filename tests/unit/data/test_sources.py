"""data/sources.py: reading raw text files (a lone surrogate escape in JSON, a JSON block read like the file)."""

from __future__ import annotations

import pytest

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.data.sources import iter_file_texts


def test_a_lone_surrogate_escape_in_json_is_read_as_the_replacement_character(tmp_path):
    from gpt2_dutch.data.sources import iter_local_texts

    broken = 'Een half emoji-paar \\ud83c hier, een heel paar \\ud83c\\udf89 daar.'
    lines = '{"text": "' + broken + '"}\n{"text": "Gewoon."}\n'
    (tmp_path / "s.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "s.json").write_text("[" + ", ".join(lines.strip().splitlines()) + "]", encoding="utf-8")
    for name in ("s.jsonl", "s.json"):
        texts = list(iter_local_texts([tmp_path / name], "text", "paragraph"))
        assert texts == ["Een half emoji-paar \ufffd hier, een heel paar \U0001f389 daar.", "Gewoon."]


def test_a_json_block_reads_like_the_file(tmp_path):
    lines = b'{"text": "een"}\n\n{"text": "twee \\ud83c"}\n'
    (tmp_path / "a.jsonl").write_bytes(lines)
    from gpt2_dutch.data.sources import iter_block_texts

    assert list(iter_block_texts(tmp_path / "a.jsonl", "jsonl", lines, 1, "text", "paragraph")) == list(
        iter_file_texts(tmp_path / "a.jsonl"))
    with pytest.raises(UsageError, match=r"a.jsonl:12: not UTF-8 text"):
        list(iter_block_texts(tmp_path / "a.jsonl", "jsonl", b'{"text": "x"}\n\xff\n', 11, "text", "line"))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("deep.jsonl", '{"text": "een"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     "deep.jsonl:2: lists or mappings nested deeper than 100 levels"),
    ("number.jsonl", '{"text": "een", "id": ' + "9" * 5000 + "}\n", "number.jsonl:1: a number of 5000 characters"),
    ("deep.json", '[{"text": "een"},\n' + "[" * 100_000 + "]" * 100_000 + "]",
     "deep.json:2: lists or mappings nested deeper than 100 levels"),
    ("number.json", '[{"text": "een", "n": 1.' + "5" * 5000 + "}]", "number.json:1: a number of 5002 characters"),
])
def test_a_record_beyond_the_json_bounds_is_one_line_naming_the_line(tmp_path, name, content, message):
    """What core/reading bounds in our own files (nesting, number length) is bounded in data files too."""
    (tmp_path / name).write_text(content)
    with pytest.raises(UsageError) as refused:
        list(iter_file_texts(tmp_path / name))
    assert message in str(refused.value) and "\n" not in str(refused.value)
