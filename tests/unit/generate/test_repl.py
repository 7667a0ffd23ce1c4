"""generate/repl.py: notices and undecodable lines go to stderr and the REPL goes on."""

from __future__ import annotations

import pytest
from helpers import DOCS

from gpt2_dutch.generate import GenerateConfig

# Every test here needs `tiny_run`, a model trained for 300 steps until it knows the corpus by heart (its
# continuations are asserted), which takes longer than the whole fast suite may; test_fault_matrix.py,
# on random models, is the fast part for generate and evaluate.
pytestmark = pytest.mark.slow


def test_repl_notices_and_undecodable_lines_go_to_stderr_and_it_goes_on(loaded):
    import io

    from gpt2_dutch.generate.repl import repl

    model, tok, _ = loaded
    stdin = io.TextIOWrapper(io.BytesIO(b"/max 12\nDe \xffx\nDe trein naar\n" + DOCS[0][:33].encode() + b"\n"))
    stdout, stderr = io.StringIO(), io.StringIO()
    assert repl(model, tok, GenerateConfig(greedy=True), stdin, stdout, stderr) == 0
    assert "De trein naar Utrecht vertrekt\n" in stdout.getvalue()  # 12 new tokens, as greedy alone gives
    n_long = len(tok(DOCS[0][:33])["input_ids"])
    assert stderr.getvalue().splitlines() == [
        "gpt2-dutch generate: input line 2 is not valid UTF-8 (byte 0xff at position 4); skipped",
        f"gpt2-dutch generate: note: the prompt ({n_long} tokens) gets {32 - n_long} new tokens, not 12 "
        "(--max-new-tokens): the model's context is 32 tokens"]
