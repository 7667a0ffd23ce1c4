"""data/sample: the built-in sample is varied Dutch text."""

from __future__ import annotations

import json

from gpt2_dutch.data.sample import builtin_sample_path


def test_builtin_sample_is_varied_dutch_text():
    docs = [json.loads(line) for line in builtin_sample_path().read_text(encoding="utf-8").splitlines()]
    assert len(docs) >= 30 and 9500 < sum(len(d["text"].split()) for d in docs) < 11000  # "about 10,000 words"
    assert len({d["title"] for d in docs}) == len(docs)
    assert {d["register"] for d in docs} == {"encyclopedisch", "nieuws", "verhaal", "instructie", "dialoog"}
    assert all(" de " in d["text"] and " het " in d["text"].lower() for d in docs)
