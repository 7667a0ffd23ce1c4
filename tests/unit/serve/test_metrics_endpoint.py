"""GET /metrics (docs/serve.md, "Metrics"): Prometheus text format from prometheus-client, scraped and parsed
with prometheus_client's own parser after known requests: requests running and waiting, prompt and generation
tokens, time-to-first-token and end-to-end latency histograms, one registry per server.

Servers run uvicorn in a thread on an untrained one-layer GPT-2 with the 300-token test BPE.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import Live, live_server

pytest.importorskip("prometheus_client")


def tiny_gpt2(small_tokenizer: Path, out: Path, context: int) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(small_tokenizer)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=context, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_model(small_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gpt2(small_tokenizer, tmp_path_factory.mktemp("metrics") / "final_model", 64)


def scrape(live: Live) -> dict[str, float]:
    """Every sample of /metrics by name (with its labels, as name{label="value"}), parsed by prometheus_client."""
    import http.client

    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-type").startswith("text/plain; version=")
    text = resp.read().decode("utf-8")
    conn.close()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


def test_metrics_count_the_tokens_and_time_of_each_request(tiny_model: Path):
    with live_server(tiny_model, max_batch=4, max_queue=4) as live:
        before = scrape(live)
        assert before["gpt2_dutch_prompt_tokens_total"] == 0 and before["gpt2_dutch_generation_tokens_total"] == 0
        assert before["gpt2_dutch_requests_running"] == 0 and before["gpt2_dutch_requests_waiting"] == 0
        assert before["gpt2_dutch_time_to_first_token_seconds_count"] == 0
        prompts, generated = 0, 0
        for body in ({"prompt": "De kat zit", "max_tokens": 5, "temperature": 0, "ignore_eos": True},
                     {"prompt": ["Het regent", "Hallo"], "max_tokens": 3, "n": 2, "ignore_eos": True, "seed": 1},
                     {"prompt": "De kat zit op de mat", "echo": True, "logprobs": 1, "max_tokens": 0}):
            usage = live.complete(**body)["usage"]
            prompts += usage["prompt_tokens"]
            generated += usage["completion_tokens"]
        streamed = live.stream(prompt="Utrecht", max_tokens=4, ignore_eos=True, temperature=0,
                               stream_options={"include_usage": True})
        prompts += streamed[-2]["usage"]["prompt_tokens"]
        generated += streamed[-2]["usage"]["completion_tokens"]
        assert live.request("POST", "/v1/completions", {"prompt": "Hallo", "max_tokens": -1})[0] == 400
        after = scrape(live)
        assert generated == 5 + 3 * 4 + 0 + 4
        assert after["gpt2_dutch_prompt_tokens_total"] == prompts
        assert after["gpt2_dutch_generation_tokens_total"] == generated
        # four answered requests (the refused one is not one): each has a first token and an end
        for name in ("gpt2_dutch_time_to_first_token_seconds", "gpt2_dutch_e2e_request_latency_seconds"):
            assert after[f"{name}_count"] == 4
            assert after[f'{name}_bucket{{le="+Inf"}}'] == 4
            assert 0 < after[f"{name}_sum"] < 60
        # every request's first token came before its end
        ttft = after["gpt2_dutch_time_to_first_token_seconds_sum"]
        assert ttft <= after["gpt2_dutch_e2e_request_latency_seconds_sum"]
        assert after["gpt2_dutch_requests_running"] == 0 and after["gpt2_dutch_requests_waiting"] == 0


@pytest.mark.slow
def test_metrics_show_requests_running_and_waiting(small_tokenizer: Path, tmp_path: Path):
    """One slot (--batch-size 1): a long request runs, the next waits; the gauges say so while they do, and each
    server counts in its own registry."""
    model = tiny_gpt2(small_tokenizer, tmp_path / "final_model", 1024)
    with live_server(model, max_batch=1, max_queue=4) as live, live_server(model, max_batch=1) as other:
        results: list[Any] = []

        def long() -> None:
            results.append(live.complete(prompt="De kat", max_tokens=1000, temperature=0, ignore_eos=True))

        threads = [threading.Thread(target=long) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        seen = scrape(live)
        while (seen["gpt2_dutch_requests_running"], seen["gpt2_dutch_requests_waiting"]) != (1, 1):
            assert time.monotonic() < deadline and not results, seen
            time.sleep(0.01)
            seen = scrape(live)
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 2
        done = scrape(live)
        assert (done["gpt2_dutch_requests_running"], done["gpt2_dutch_requests_waiting"]) == (0, 0)
        assert done["gpt2_dutch_generation_tokens_total"] == 2000
        assert scrape(other)["gpt2_dutch_generation_tokens_total"] == 0  # its own registry: nothing of live's


def test_metrics_need_the_api_key_when_one_is_set(tiny_model: Path):
    with live_server(tiny_model, api_key="s3cret") as live:
        status, _, answer = live.request("GET", "/metrics")
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        status, headers, body = live.request("GET", "/metrics", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and "gpt2_dutch_requests_running" in body
