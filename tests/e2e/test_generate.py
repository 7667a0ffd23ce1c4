"""`gpt2-dutch generate --interactive` as a user runs it: through a pseudo-terminal (Ctrl-C stops a generation) and
with piped stdin."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

# Every test here needs `tiny_run`, a model trained for 300 steps until it knows the corpus by heart (its
# continuations are asserted), which takes longer than the whole fast suite may; test_fault_matrix.py,
# on random models, is the fast part for generate and evaluate.
pytestmark = pytest.mark.slow


def test_interactive_through_a_pseudo_terminal(long_context_model):
    pexpect = pytest.importorskip("pexpect")
    tiny_run = long_context_model
    # SIGINT back to its default in the child: a test run started in the background by a non-interactive shell
    # (`cmd &`, nohup) ignores SIGINT, exec keeps that, and Python then installs no KeyboardInterrupt handler, so
    # Ctrl-C could not reach the REPL (the generation ran to its end and no "[stopped]" came)
    child = pexpect.spawn(sys.executable, ["-m", "gpt2_dutch", "generate", "--model-path", str(tiny_run),
                                           "--interactive", "--precision", "fp32", "--max-new-tokens", "4000"],
                          encoding="utf-8", timeout=60, env={"HOME": str(tiny_run), "PATH": "/usr/bin:/bin",
                                                             "GPT2_DUTCH_HISTORY": str(tiny_run / "hist")},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect("/help for commands")
    child.expect("> ")
    child.sendline("/temp 0.7")
    child.expect("temperature = 0.7")
    child.sendline("/max 0")
    child.expect("--max-new-tokens must be positive")
    child.sendline("Het museum")  # ~4,000 tokens: still generating when Ctrl-C arrives
    child.expect("Het museum")
    child.expect(".{20}")  # text is streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("> ")
    child.sendline("/max 5")
    child.expect("max_new_tokens = 5")
    child.sendline("De trein")
    child.expect("De trein")
    child.expect("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_interactive_with_piped_stdin(tiny_run):
    r = subprocess.run([sys.executable, "-m", "gpt2_dutch", "generate", "--model-path", str(tiny_run),
                        "--interactive", "--greedy", "--max-new-tokens", "60", "--precision", "fp32"],
                       input="/topk 5\nDe trein naar\n/quit\nnever reached\n", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "top_k = 5" in r.stdout and "De trein naar Utrecht vertrekt" in r.stdout
    assert "never reached" not in r.stdout
