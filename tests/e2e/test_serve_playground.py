"""The playground at / in a real headless browser: Debian's chromium driven by Playwright (no browser download).

    pytest tests/e2e/test_serve_playground.py         # needs `apt-get install chromium` (.ci/run installs it)

Types a prompt, presses Generate and watches the text stream in; reads the model card and its loss curve; stops a
long generation with the Stop button. Skips with the reason where Playwright or chromium is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from helpers import SERVED_STEPS, greedy_generate, live_server

pytestmark = pytest.mark.slow


def chromium_path() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        path = name and shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on PATH: install it with `apt-get install chromium` (.ci/run does)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    executable = chromium_path()
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where chromium refuses its sandbox
        b = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_type_a_prompt_press_generate_and_watch_the_text_stream_in(browser, served_run: Path, served_loaded):
    prompt = "De trein naar Utrecht"
    with live_server(served_run) as live:
        page = browser.new_page()
        seen: list[str] = []  # the generated text each time it changed: it must grow token by token
        page.expose_function("record", lambda text: seen.append(text))
        page.goto(live.url + "/")
        page.evaluate("""() => new MutationObserver(() => {
            const g = document.getElementById('generated'); if (g) window.record(g.textContent);
        }).observe(document.getElementById('output'), {subtree: true, childList: true, characterData: true})""")
        # the model card, read from the run's config, run_config.json and metrics.jsonl
        page.wait_for_selector("dd[data-field='parameters']")
        assert page.inner_text("#model-name") == served_run.name
        assert page.inner_text("dd[data-field='layers × width']") == "4 × 256"
        assert page.inner_text("dd[data-field='training tokens']") == str(SERVED_STEPS * 4 * 32)
        assert page.inner_text("dd[data-field='bits per byte']") != "–"
        assert page.locator("#curve path.train-loss").count() == 1
        assert page.locator("#curve circle").count() == 2  # served_run's two evaluations (half-way and at the end)

        page.fill("#prompt", prompt)
        page.eval_on_selector("#temperature", "e => { e.value = 0; e.dispatchEvent(new Event('input')); }")
        page.eval_on_selector("#max_tokens", "e => { e.value = 10; e.dispatchEvent(new Event('input')); }")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.includes('tokens/s,')")
        expected = greedy_generate(served_loaded, [prompt], 10)[0]
        assert page.inner_text("#generated") == expected
        assert page.inner_text("#output .prompt") == prompt
        distinct = [t for i, t in enumerate(seen) if i == 0 or t != seen[i - 1]]
        # it grew piece by piece, not in one go (on a loaded machine several tokens may land in one repaint)
        assert len(distinct) >= 2 and distinct[0] != expected and distinct[-1] == expected
        assert all(expected.startswith(t) for t in distinct)
        assert "10 tokens" in page.inner_text("#status")
        page.close()


def test_the_stop_button_ends_a_long_generation(browser, long_model: Path):
    with live_server(long_model) as live:
        page = browser.new_page()
        # the untrained model samples <|endoftext|> now and then (~1 in 300 tokens), which ended some generations
        # before Stop could be clicked: the page's request goes out with ignore_eos, so only Stop ends it
        page.route("**/v1/completions", lambda route: route.continue_(
            post_data=json.dumps({**json.loads(route.request.post_data), "ignore_eos": True})))
        page.goto(live.url + "/")
        page.wait_for_selector("dd[data-field='parameters']")  # the card sets the slider's range: wait for it
        page.eval_on_selector("#max_tokens", "e => { e.max = 2000; e.value = 2000; "
                                             "e.dispatchEvent(new Event('input')); }")
        page.click("#generate")
        page.wait_for_function("document.getElementById('generated')?.textContent.length > 5")
        assert live.health()["running"] == 1
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('stopped')")
        assert page.is_enabled("#generate") and not page.is_enabled("#stop")
        deadline = time.monotonic() + 5
        while live.health()["running"] and time.monotonic() < deadline:
            page.wait_for_timeout(20)
        assert live.health()["running"] == 0  # the abandoned request left the batch
        page.close()
