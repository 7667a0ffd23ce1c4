"""The `gpt2-dutch serve` command as a process: the OpenAI client streams from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import PROMPTS, free_port, greedy_generate


@pytest.mark.slow
def test_the_serve_command_runs_a_server_the_openai_client_streams_from(served_run: Path, served_loaded: Any):
    """`python -m gpt2_dutch serve` as a user starts it, through the -latest link, stopped with SIGINT."""
    import signal
    import subprocess
    import sys

    openai = pytest.importorskip("openai")
    port = free_port()
    latest = served_run.parent / "gpt2-dutch-tiny-latest"
    proc = subprocess.Popen([sys.executable, "-m", "gpt2_dutch", "serve", "--model-path", str(latest), "--port",
                             str(port), "--precision", "fp32", "--device", "cpu"],
                            stderr=subprocess.PIPE, text=True)
    try:
        from gpt2_dutch.bench.serve_speed import wait_healthy

        wait_healthy(port, proc, timeout=120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        chunks = list(client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == greedy_generate(served_loaded, [PROMPTS[1]], 8)[0]
        assert chunks[0].model == served_run.name  # the run the -latest link points at
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"on http://127.0.0.1:{port}/" in err and "Traceback" not in err
