"""serve/app.py against a live server on a free loopback port, over real HTTP and with OpenAI's own client.

The servers run uvicorn in a thread of the test process on a tiny GPT-2 trained for a few steps (its run dir has
real run_config.json and metrics.jsonl), or on an untrained tiny GPT-2 with a long context for requests that must
last a while (queue, disconnects)."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import PROMPTS, SERVED_STEPS, Live, greedy_generate, live_server

# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def live(served_run: Path) -> Iterator[Live]:
    with live_server(served_run, max_batch=16, max_queue=64) as s:
        yield s


# ------------------------------------------------------------------------------------------- what it answers


def test_greedy_text_equals_generate(live: Live, served_loaded: Any):
    expected = greedy_generate(served_loaded, PROMPTS, 12)
    for prompt, text in zip(PROMPTS, expected, strict=True):
        answer = live.complete(prompt=prompt, max_tokens=12, temperature=0)
        assert answer["choices"][0]["text"] == text
        assert answer["object"] == "text_completion" and answer["model"] == live.server.name
    # a list of prompts: one choice per prompt, in order
    answer = live.complete(prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c["text"] for c in answer["choices"]] == expected
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]


def test_usage_counts_the_prompt_and_the_generated_tokens(live: Live, served_loaded: Any):
    tok = served_loaded[1]
    answer = live.complete(prompt=PROMPTS[:2], max_tokens=5, temperature=0, n=2)
    prompt_tokens = sum(len(tok(p)["input_ids"]) for p in PROMPTS[:2])
    generated = answer["usage"]["completion_tokens"]
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                               "total_tokens": prompt_tokens + generated}
    # each choice stops at max_tokens ("length") or earlier at <|endoftext|> ("stop")
    assert len(answer["choices"]) == 4 and 0 < generated <= 4 * 5
    assert all(c["finish_reason"] in ("length", "stop") for c in answer["choices"])


def test_streamed_chunks_are_one_per_token_and_concatenate_to_the_whole_text(live: Live):
    for body in ({"temperature": 0}, {"temperature": 1.0, "seed": 7, "top_k": 20, "top_p": 0.9}):
        whole = live.complete(prompt=PROMPTS[0], max_tokens=15, **body)
        events = live.stream(prompt=PROMPTS[0], max_tokens=15, stream_options={"include_usage": True}, **body)
        assert events[-1] == "[DONE]"
        chunks, usage = events[:-2], events[-2]
        token_chunks = [c for c in chunks if c["choices"][0]["finish_reason"] is None]
        assert len(token_chunks) == whole["usage"]["completion_tokens"] == usage["usage"]["completion_tokens"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
        assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_a_seed_makes_n_samples_reproducible(live: Live):
    body = {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 1.0, "n": 2, "seed": 1234}
    first, again = live.complete(**body), live.complete(**body)
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    # choice j draws with seed + j: the first choice of n=2 is the n=1 answer with the same seed
    single = live.complete(**{**body, "n": 1})
    assert single["choices"][0]["text"] == first["choices"][0]["text"]
    other = live.complete(**{**body, "seed": 99})
    assert [c["text"] for c in other["choices"]] != [c["text"] for c in first["choices"]]


def test_stop_strings_cut_the_text_streamed_or_not(live: Live):
    # the prompt with the longest greedy text (a tiny model may end some texts after a token or two)
    texts = {p: live.complete(prompt=p, max_tokens=12, temperature=0)["choices"][0]["text"] for p in PROMPTS}
    prompt = max(PROMPTS, key=lambda p: len(texts[p].strip()))
    full = texts[prompt]
    stop = full.strip()[2:4]  # two characters from inside the greedy text
    assert len(stop) == 2 and stop in full, texts
    cut = full[:full.index(stop)]
    answer = live.complete(prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "zzzz"])
    assert answer["choices"][0] == {"text": cut, "index": 0, "logprobs": None, "finish_reason": "stop"}
    events = live.stream(prompt=prompt, max_tokens=12, temperature=0, stop=stop)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_requests_share_the_batch_and_get_their_own_answers(live: Live, served_loaded: Any):
    """Eight clients at once: each gets the text it gets alone, and the engine ran them in shared steps."""
    prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS][:8]
    expected = greedy_generate(served_loaded, prompts, 12)
    before = dict(live.server.engine.__dict__)
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = live.complete(prompt=prompts[i], max_tokens=12, temperature=0)["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [answers[i] for i in range(len(prompts))] == expected
    steps = live.server.engine.steps - before["steps"]
    rows = live.server.engine.step_rows - before["step_rows"]
    assert rows / steps > 1.5  # several sequences per forward pass, not one after the other


def test_models_health_card_and_page(live: Live, served_run: Path):
    status, _, models = live.request("GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == served_run.name == live.server.name
    health = live.health()
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0
    status, _, card = live.request("GET", "/v1/model_card")
    records = [json.loads(line) for line in (served_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert card["layers"] == 4 and card["width"] == 256 and card["context"] == 32
    assert card["parameters"] == json.loads((served_run / "run_config.json").read_text())["parameters"]
    assert card["training_tokens"] == max(r["tokens"] for r in records if "tokens" in r) == SERVED_STEPS * 4 * 32
    assert card["eval"]["step"] == SERVED_STEPS and math.isclose(card["eval"]["loss"], evals[-1]["eval_loss"])
    assert math.isclose(card["eval"]["bits_per_byte"], evals[-1]["eval_bpb"])
    assert [p[0] for p in card["loss_curve"]["eval"]] == [SERVED_STEPS // 2, SERVED_STEPS]
    assert len(card["loss_curve"]["train"]) == sum("loss" in r for r in records)
    status, headers, page = live.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    # self-contained: no script, style, font or image from anywhere else
    assert "/v1/completions" in page and "<script src" not in page and "<link" not in page
    assert "https://" not in page and "cdn" not in page.lower()


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _absolute_paths(strings: Iterator[str], roots: list[str]) -> list[str]:
    """The strings that name a place on this machine: absolute (POSIX or a Windows drive), or holding a root."""
    return [s for s in strings if s.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:[\\/]", s)
            or any(root in s for root in roots)]


def test_no_local_path_reaches_the_api_card_or_the_readme(live: Live, served_run: Path,
                                                          tmp_path_factory: pytest.TempPathFactory):
    roots = [str(tmp_path_factory.getbasetemp()), str(served_run.parent), str(Path.home())]
    status, _, card = live.request("GET", "/v1/model_card")
    assert status == 200 and _absolute_paths(_strings(card), roots) == []
    readme = (served_run / "final_model" / "README.md").read_text(encoding="utf-8")
    words = re.split(r"[\s()|`'\"\[\]]+", readme)  # the card's text cut at spaces, brackets and quotes
    assert _absolute_paths(iter(words), roots) == []


def test_the_openai_client_works_unchanged(live: Live, served_loaded: Any):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [live.server.name]
    expected = greedy_generate(served_loaded, [PROMPTS[0]], 10)[0]
    answer = client.completions.create(model=live.server.name, prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert answer.choices[0].text == expected and answer.usage.completion_tokens > 0
    chunks = list(client.completions.create(model=live.server.name, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and len(chunks) > 2
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=live.server.name, prompt=PROMPTS[0], max_tokens=0)
    assert "max_tokens" in str(bad.value)


# ------------------------------------------------------------------------------------------------- bad input


BAD_REQUESTS = [  # (id, body as raw bytes or a JSON object, the bad field (param), words of the message)
    ("malformed JSON", b'{"prompt": "Hallo", ', None, "not valid JSON"),
    ("not UTF-8", b'{"prompt": "\xff"}', None, "UTF-8"),
    ("not an object", [1, 2], None, "JSON object"),
    ("no prompt", {"max_tokens": 5}, "prompt", "required"),
    ("empty prompt", {"prompt": ""}, "prompt", "empty"),
    ("empty prompt list", {"prompt": []}, "prompt", "non-empty list"),
    ("an empty prompt in a list", {"prompt": ["Hallo", ""]}, "prompt", "empty"),
    ("prompt a number", {"prompt": 5}, "prompt", "string"),
    ("prompt token ids", {"prompt": [1, 2, 3]}, "prompt", "token ids"),
    ("over-long prompt", {"prompt": "De trein naar Utrecht vertrekt " * 20}, "prompt", "context"),
    ("max_tokens 0", {"prompt": "Hallo", "max_tokens": 0}, "max_tokens", "at least 1"),
    ("max_tokens negative", {"prompt": "Hallo", "max_tokens": -5}, "max_tokens", "at least 1"),
    ("max_tokens beyond the context", {"prompt": "Hallo", "max_tokens": 10_000}, "max_tokens", "context"),
    ("max_tokens a string", {"prompt": "Hallo", "max_tokens": "10"}, "max_tokens", "integer"),
    ("max_tokens a fraction", {"prompt": "Hallo", "max_tokens": 2.5}, "max_tokens", "integer"),
    ("max_tokens a boolean", {"prompt": "Hallo", "max_tokens": True}, "max_tokens", "integer"),
    ("temperature negative", {"prompt": "Hallo", "temperature": -0.1}, "temperature", "between 0"),
    ("temperature NaN", b'{"prompt": "Hallo", "temperature": NaN}', "temperature", "finite"),
    ("temperature infinite", b'{"prompt": "Hallo", "temperature": Infinity}', "temperature", "finite"),
    ("temperature too high", {"prompt": "Hallo", "temperature": 5}, "temperature", "between 0"),
    ("temperature a string", {"prompt": "Hallo", "temperature": "hot"}, "temperature", "number"),
    ("top_p 0", {"prompt": "Hallo", "top_p": 0}, "top_p", "(0, 1]"),
    ("top_p above 1", {"prompt": "Hallo", "top_p": 1.5}, "top_p", "(0, 1]"),
    ("top_p NaN", b'{"prompt": "Hallo", "top_p": NaN}', "top_p", "finite"),
    ("top_k negative", {"prompt": "Hallo", "top_k": -1}, "top_k", "0 (off)"),
    ("n 0", {"prompt": "Hallo", "n": 0}, "n", "at least 1"),
    ("n beyond the batch", {"prompt": "Hallo", "n": 17}, "n", "--batch-size"),
    ("seed negative", {"prompt": "Hallo", "seed": -1}, "seed", "between 0"),
    ("seed a string", {"prompt": "Hallo", "seed": "42"}, "seed", "integer"),
    ("stop a number", {"prompt": "Hallo", "stop": 3}, "stop", "string"),
    ("five stops", {"prompt": "Hallo", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ("an empty stop", {"prompt": "Hallo", "stop": [""]}, "stop", "non-empty"),
    ("stream a string", {"prompt": "Hallo", "stream": "yes"}, "stream", "true or false"),
    ("stream_options a list", {"prompt": "Hallo", "stream_options": [1]}, "stream_options", "include_usage"),
    ("model a number", {"prompt": "Hallo", "model": 3}, "model", "string"),
    ("echo a string", {"prompt": "Hallo", "echo": "yes"}, "echo", "true or false"),
    ("logprobs beyond 20", {"prompt": "Hallo", "logprobs": 21}, "logprobs", "between 0 and 20"),
    ("a penalty beyond 2", {"prompt": "Hallo", "presence_penalty": 2.5}, "presence_penalty", "between -2 and 2"),
    ("suffix", {"prompt": "Hallo", "suffix": "!"}, "suffix", "not supported"),
    ("best_of", {"prompt": "Hallo", "best_of": 3}, "best_of", "not supported"),
    ("ignore_eos a string", {"prompt": "Hallo", "ignore_eos": "yes"}, "ignore_eos", "true or false"),
]


@pytest.mark.parametrize("body,param,words", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_400_with_an_openai_error_body(live: Live, body: Any, param: str | None, words: str):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    for stream in (False, True):  # the same answer whether or not the request asked to stream
        if stream and isinstance(body, dict) and "stream" not in body:
            raw = json.dumps({**body, "stream": True}).encode()
        status, headers, answer = live.request("POST", "/v1/completions", raw=raw)
        assert status == 400, answer
        assert headers["content-type"] == "application/json"
        error = answer["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]
        assert "Traceback" not in error["message"]


def test_bad_requests_leave_the_others_alone(live: Live, served_loaded: Any):
    """Bad requests sent while good ones decode: every good one gets exactly its answer, the server stays up."""
    expected = greedy_generate(served_loaded, PROMPTS, 12)
    answers: dict[int, str] = {}

    def good(i: int) -> None:
        answers[i] = live.complete(prompt=PROMPTS[i], max_tokens=12, temperature=0)["choices"][0]["text"]

    threads = [threading.Thread(target=good, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for _, body, *_ in BAD_REQUESTS:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        assert live.request("POST", "/v1/completions", raw=raw)[0] == 400
    for t in threads:
        t.join()
    assert [answers[i] for i in range(3)] == expected
    assert live.health()["status"] == "ok"


def test_unknown_routes_and_methods_answer_in_the_same_error_format(live: Live):
    status, _, answer = live.request("GET", "/v1/nothing")
    assert status == 404 and answer["error"]["message"] == "Not Found"
    status, _, answer = live.request("GET", "/v1/completions")
    assert status == 405 and "error" in answer


# ------------------------------------------------------------------------------------ queue, disconnects, auth


def _open_stream(port: int, body: dict[str, Any]) -> tuple[socket.socket, Any]:
    """A streamed request on a raw socket: (socket, its reader), the response headers read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    payload = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"HTTP/1.1 200")
    while reader.readline() not in (b"\r\n", b""):
        pass
    return sock, reader


def _wait_for(condition: Any, timeout: float = 60) -> None:
    """Until `condition()` holds; the timeout only keeps a hang from lasting forever (no speed is asserted)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# A slot freed "at once": within this many decode steps after the client left (of its 2000 tokens), counted by
# the engine, so the check is the same on a fast machine and a busy one
FREED_WITHIN_STEPS = 50


def test_a_full_queue_answers_503_and_a_disconnect_frees_its_slot_at_once(long_model: Path):
    with live_server(long_model, max_batch=1, max_queue=1) as live:
        long_body = {"prompt": "De trein", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
        sock, reader = _open_stream(live.port, long_body)  # takes the one slot
        reader.readline()  # its first token arrived: it is decoding
        waiting: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: waiting.update(
            answer=live.complete(prompt="Het regent", max_tokens=3, temperature=0)))
        thread.start()
        _wait_for(lambda: live.health()["waiting"] == 1)
        status, headers, answer = live.request("POST", "/v1/completions", {"prompt": "Oma", "max_tokens": 3})
        assert status == 503 and headers["retry-after"] == "1"
        assert answer["error"]["code"] == "queue_full" and "--max-queue" in answer["error"]["message"]
        # the streaming client goes away: its slot goes to the waiting request, which then completes
        left_at = live.server.engine.steps
        sock.close()
        reader.close()
        thread.join(timeout=60)
        assert not thread.is_alive() and waiting["answer"]["usage"]["completion_tokens"] == 3
        _wait_for(lambda: live.health()["running"] == 0)
        steps = live.server.engine.steps
        assert steps - left_at < FREED_WITHIN_STEPS
        time.sleep(0.3)
        assert live.server.engine.steps == steps  # nothing decodes for the client that left


def test_a_non_streaming_client_that_leaves_frees_its_slot(long_model: Path):
    with live_server(long_model, max_batch=4, max_queue=4) as live:
        sock = socket.create_connection(("127.0.0.1", live.port), timeout=30)
        payload = json.dumps({"prompt": "De trein", "max_tokens": 2000, "temperature": 0,
                              "ignore_eos": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        _wait_for(lambda: live.health()["running"] == 1)
        left_at = live.server.engine.steps
        sock.close()
        _wait_for(lambda: live.health()["running"] == 0)
        assert live.server.engine.steps - left_at < FREED_WITHIN_STEPS


@pytest.mark.slow
def test_a_request_that_fails_in_prefill_fails_alone(long_model: Path, monkeypatch):
    """A fault while a new request is prefilled (say, out of memory for its prompt): that request gets a 500 with
    an OpenAI error body, the one already decoding goes on to its last token."""
    from gpt2_dutch.serve.engine import Engine

    prefill = Engine._prefill

    def faulty(self, groups):  # noqa: ANN001, ANN202
        if any(seq.prompt_ids == poison for g in groups for seq in g.sequences):
            raise RuntimeError("out of memory (simulated)")
        return prefill(self, groups)

    monkeypatch.setattr(Engine, "_prefill", faulty)
    with live_server(long_model, max_batch=4) as live:
        poison = live.server.tokenizer("Vergif")["input_ids"]
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(answer=live.complete(
            prompt="De trein", max_tokens=300, temperature=0, ignore_eos=True)))
        thread.start()
        _wait_for(lambda: live.health()["running"] == 1)
        status, _, answer = live.request("POST", "/v1/completions", {"prompt": "Vergif", "max_tokens": 5})
        assert status == 500 and answer["error"]["type"] == "server_error"
        assert "out of memory (simulated)" in answer["error"]["message"] and "Traceback" not in json.dumps(answer)
        thread.join(timeout=60)
        assert result["answer"]["usage"]["completion_tokens"] == 300
        assert result["answer"]["choices"][0]["finish_reason"] == "length"


def test_an_api_key_guards_every_route_but_health(served_run: Path):
    with live_server(served_run, api_key="s3cret") as live:
        assert live.request("GET", "/health")[0] == 200
        for method, path, body in (("GET", "/v1/models", None), ("GET", "/v1/model_card", None),
                                   ("POST", "/v1/completions", {"prompt": "Hallo", "max_tokens": 2})):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                status, got, answer = live.request(method, path, body, headers)
                assert status == 401 and answer["error"]["code"] == "invalid_api_key", (path, headers)
                assert got["www-authenticate"] == "Bearer"
            assert live.request(method, path, body, {"Authorization": "Bearer s3cret"})[0] == 200
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="x", prompt="Hallo", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="nope", max_retries=0).models.list()


# ------------------------------------------------------------------------------------------ the command line


# ------------------------------------------------------------------------------------- sampling, the bench part


def test_text_deltas_wait_for_whole_characters_and_hold_back_a_stop_string(served_loaded: Any):
    from gpt2_dutch.serve.app import TextStream

    tok = served_loaded[1]
    text = "\u201cWaar is mijn fiets?\u201d vroeg \u00e9\u00e9n caf\u00e9-eigenaar \U0001F6B2 in Utrecht."
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text) / 2  # the 300-token BPE splits the accented letters and the emoji into bytes
    stream = TextStream(tok, [])
    deltas = [stream.add(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)
    # a stop string is cut off, and nothing of it leaks out in the deltas before it is complete
    stream = TextStream(tok, ["fiets?", "Utrecht"])
    deltas = []
    for i in ids:
        deltas.append(stream.add(i))
        if stream.stopped:
            break
    assert stream.stopped and "".join(deltas) + stream.finish() == "\u201cWaar is mijn "
    assert not any("fi" in d for d in deltas)
