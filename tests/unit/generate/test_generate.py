"""The generate command (generate/__init__.py): what it capped and truncated, per prompt in --json."""

from __future__ import annotations

import json

import pytest
from helpers import DOCS

# Every test here needs `tiny_run`, a model trained for 300 steps until it knows the corpus by heart (its
# continuations are asserted), which takes longer than the whole fast suite may; test_fault_matrix.py,
# on random models, is the fast part for generate and evaluate.
pytestmark = pytest.mark.slow


def test_cli_says_what_it_capped_and_truncated_and_json_has_it_per_prompt(tiny_run, loaded, cli):
    tok = loaded[1]
    short, long, too_long = "De trein naar", DOCS[0][:33], " ".join(DOCS[:2])
    n_long, n_too_long = len(tok(long)["input_ids"]), len(tok(too_long)["input_ids"])
    rc, out, err = cli("generate", "--model-path", tiny_run, "--precision", "fp32", "--greedy", "--json",
                       "--max-new-tokens", "12", "--prompt", short, "--prompt", long, "--prompt", too_long)
    assert rc == 0, err
    result = json.loads(out)
    assert [(r["prompt_tokens"], r["dropped_tokens"], r["max_new_tokens"]) for r in result] == [
        (len(tok(short)["input_ids"]), 0, 12), (n_long, 0, 32 - n_long), (n_too_long, n_too_long - 31, 1)]
    assert result[0]["completions"] == [" Utrecht vertrekt"]
    notes = [line for line in err.splitlines() if "note:" in line]
    assert notes == [
        f"gpt2-dutch generate: note: prompt 2 ({n_long} tokens) gets {32 - n_long} new tokens, not 12 "
        "(--max-new-tokens): the model's context is 32 tokens",
        f"gpt2-dutch generate: note: prompt 3 ({n_too_long} tokens) is longer than the model's 32-token context: "
        f"its first {n_too_long - 31} tokens were dropped, its last 31 kept; it gets 1 new token, not 12 "
        "(--max-new-tokens)"]
    rc, out, err = cli("generate", "--model-path", tiny_run, "--precision", "fp32", "--greedy", "--max-new-tokens",
                       "12", "--prompt", short)
    assert rc == 0 and "note:" not in err and ">>> De trein naar Utrecht vertrekt\n" in out
