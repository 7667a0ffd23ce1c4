"""What the server promises about exposure (docs/serve.md, "Exposure"): every malformed body is a 400, bodies are
bounded while they arrive, prompts and stop strings are bounded and cheap, only loopback Host names (and
--allowed-hosts) are answered, POST needs the JSON content type, and no local path reaches a client.

One live server (uvicorn in a thread, loopback, a free port) on an untrained one-layer GPT-2 with the 300-token
test BPE; requests over raw sockets, so that every header and every byte is the test's.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import random_model_dir

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.serve import ServeConfig, host_allowlist
from gpt2_dutch.serve.app import StopMatcher, TextStream, public
from gpt2_dutch.serve.protocol import MAX_BODY_BYTES, MAX_DEPTH, MAX_NUMBER_CHARS, MAX_STOP_CHARS

CONTEXT = 64


@pytest.fixture(scope="module")
def tiny_model(small_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained GPT-2 (one layer, width 32, a 64-token context) with the test BPE: a final_model directory."""
    return random_model_dir(tmp_path_factory.mktemp("hardening") / "final_model", small_tokenizer, CONTEXT)


@contextlib.contextmanager
def running(model: Path, allowed_hosts: list[str] | None = None) -> Iterator[Any]:
    import uvicorn

    from gpt2_dutch.serve import LOOPBACK_HOSTS, build_server
    from gpt2_dutch.serve.app import create_app

    server = build_server(str(model), device="cpu", precision="fp32", max_batch=4, max_queue=8)
    sock = socket.create_server(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(create_app(server, allowed_hosts or LOOPBACK_HOSTS), log_level="critical"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    server.port = sock.getsockname()[1]
    try:
        yield server
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def live(tiny_model: Path) -> Iterator[Any]:
    with running(tiny_model) as server:
        yield server


def send(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 request on a raw socket, exactly these headers (Host and Content-Length unless given)."""
    headers = {"Host": f"127.0.0.1:{port}", "Content-Length": str(len(body)), **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items() if v is not None)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        with contextlib.suppress(OSError):  # a server that refuses a body early may close before it has all come
            sock.sendall(head.encode("latin-1") + b"Connection: close\r\n\r\n" + body)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], Any]:
    """Status, headers and parsed body, read to the end of the connection. A reset after the answer came is
    its end too: a server that closes on a body it did not read has the kernel reset the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            assert data, "the connection was reset before any answer"
            break
        if not chunk:
            break
        data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    fields = {k.lower(): v for k, v in fields.items()}
    if fields.get("transfer-encoding") == "chunked":
        payload = _unchunk(payload)
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = payload.decode("utf-8", "replace")
    return int(lines[0].split()[1]), fields, parsed


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, data = out + data[:n], data[n + 2:]
    return out


def post(port: int, body: Any, **headers: str) -> tuple[int, dict[str, str], Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return send(port, "POST", "/v1/completions", raw, {"Content-Type": "application/json", **headers})


def assert_error(answer: Any, status: int, got: int, words: str) -> None:
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and words in answer["error"]["message"]
    assert "\n" not in answer["error"]["message"] and "Traceback" not in answer["error"]["message"]


# ------------------------------------------------------------------------------------------- malformed bodies

MALFORMED = [  # (id, raw body, words of the message)
    ("nested 100,000 deep", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", f"deeper than {MAX_DEPTH}"),
    ("objects nested 100,000 deep", b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, f"deeper than {MAX_DEPTH}"),
    ("nested 33 deep", b'{"prompt": "Hallo", "x": ' + b"[" * 32 + b"]" * 32 + b"}", f"deeper than {MAX_DEPTH}"),
    ("unclosed 100,000 deep", b"[" * 100_000, f"deeper than {MAX_DEPTH}"),
    ("a 5,000-digit max_tokens", b'{"prompt": "Hallo", "max_tokens": ' + b"9" * 5000 + b"}", "5000 characters"),
    ("a 5,000-digit fraction", b'{"prompt": "Hallo", "top_p": 0.' + b"1" * 5000 + b"}", "5002 characters"),
    ("a 5,000-digit unknown field", b'{"prompt": "Hallo", "x": -' + b"1" * 5000 + b"}", "5001 characters"),
    ("a 99-digit max_tokens", b'{"prompt": "Hallo", "max_tokens": ' + b"9" * 99 + b"}", "out of range"),
    ("a 25-digit seed", b'{"prompt": "Hallo", "seed": ' + b"7" * 25 + b"}", "out of range"),
    ("1e999 as temperature", b'{"prompt": "Hallo", "temperature": 1e999}', "finite"),
    ("a lone high surrogate in the prompt", b'{"prompt": "Hallo \\ud800"}', "lone UTF-16 surrogate"),
    ("a lone low surrogate in a stop", b'{"prompt": "Hallo", "stop": ["\\udfff"]}', "lone UTF-16 surrogate"),
    ("a lone surrogate in a key", b'{"prompt": "Hallo", "\\udc00": 1}', "lone UTF-16 surrogate"),
    ("a reversed pair", b'{"prompt": "\\ude00\\ud83d"}', "lone UTF-16 surrogate"),
    ("a raw surrogate (not UTF-8)", b'{"prompt": "\xed\xa0\x80"}', "not UTF-8"),
    ("a UTF-16 body", '{"prompt": "Hallo"}'.encode("utf-16"), "not UTF-8"),
    ("empty", b"", "not valid JSON"),
    ("a bare string", b'"Hallo"', "JSON object"),
    ("null", b"null", "JSON object"),
    ("prompt an object", b'{"prompt": {"text": "Hallo"}}', "string"),
    ("prompt a mixed list", b'{"prompt": ["Hallo", 3]}', "string"),
    ("prompt a list of lists", b'{"prompt": [["Hallo"]]}', "string"),
    ("max_tokens a list", b'{"prompt": "Hallo", "max_tokens": [5]}', "integer"),
    ("n an object", b'{"prompt": "Hallo", "n": {}}', "integer"),
    ("top_k a string", b'{"prompt": "Hallo", "top_k": "5"}', "integer"),
    ("top_p a boolean", b'{"prompt": "Hallo", "top_p": true}', "number"),
    ("stop a list of numbers", b'{"prompt": "Hallo", "stop": [1, 2]}', "string"),
    ("stop an object", b'{"prompt": "Hallo", "stop": {"a": 1}}', "string"),
    ("stream_options a string", b'{"prompt": "Hallo", "stream_options": "yes"}', "include_usage"),
    ("include_usage a number", b'{"prompt": "Hallo", "stream_options": {"include_usage": 1}}', "include_usage"),
    ("logit_bias a list", b'{"prompt": "Hallo", "logit_bias": []}', "not supported"),
    ("best_of a string", b'{"prompt": "Hallo", "best_of": "2"}', "not supported"),
    ("a stop too long", json.dumps({"prompt": "Hallo", "stop": "x" * (MAX_STOP_CHARS + 1)}).encode(),
     f"at most {MAX_STOP_CHARS} characters"),
    ("a 250,000-character stop", json.dumps({"prompt": "Hallo", "stop": ["ab", "x" * 250_000]}).encode(),
     "the longest of 250000"),
]


@pytest.mark.parametrize(("body", "words"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_every_malformed_body_is_a_400_in_one_line(live: Any, body: bytes, words: str):
    status, headers, answer = post(live.port, body)
    assert_error(answer, 400, status, words)
    assert headers["content-type"] == "application/json"
    assert len(answer["error"]["message"]) < 300  # no value echoed whole


def test_a_body_at_the_depth_limit_and_a_valid_surrogate_pair_are_fine(live: Any):
    nested = b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1)  # the object itself is the first level
    status, _, answer = post(live.port, b'{"prompt": "Hallo", "max_tokens": 2, "x": ' + nested + b"}")
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1
    pair = b"\\ud83d\\ude00"  # one character outside the BMP, escaped as JSON does
    status, _, answer = post(live.port, b'{"prompt": "Hallo ' + pair + b'", "max_tokens": 2, "stop": "' + pair + b'"}')
    assert status == 200, answer
    number = b"1" + b"0" * (MAX_NUMBER_CHARS - 1)  # a long literal, within the limit: an unknown field, ignored
    assert post(live.port, b'{"prompt": "Hallo", "max_tokens": 2, "x": ' + number + b"}")[0] == 200


# --------------------------------------------------------------------------------------------- body size

@pytest.mark.parametrize("length", [MAX_BODY_BYTES + 1, 200 * 2**20, 10**18 - 1, 10**40])
def test_a_declared_length_beyond_the_limit_is_refused_before_the_body_is_read(live: Any, length: int):
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())  # and not a byte of it
        status, headers, answer = read_response(sock)
    if length > 10**18:  # the HTTP server refuses this length itself, in its own words
        assert status == 400 and headers["connection"] == "close"
        return
    assert_error(answer, 413, status, f"at most {MAX_BODY_BYTES} bytes")
    assert headers["connection"] == "close" and str(length) in answer["error"]["message"]


def test_a_200_mb_chunked_body_is_refused_once_past_the_limit_not_once_read(live: Any):
    """The client sends 64 KiB chunks and stops as soon as an answer arrives (or the server stops taking
    bytes): the server answered after about the limit, far from the 200 MB a whole read takes."""
    import select

    chunk = b"%x\r\n%s\r\n" % (65536, b"[" + b" " * 65535)
    sent = 0
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        sock.settimeout(5)
        with contextlib.suppress(OSError):  # the server may close its side once it has answered
            while sent < 200 * 2**20 and not select.select([sock], [], [], 0)[0]:
                sock.sendall(chunk)
                sent += 65536
        sock.settimeout(30)
        status, _, answer = read_response(sock)
    assert_error(answer, 413, status, f"at most {MAX_BODY_BYTES} bytes")
    # what the server read is at most the limit and a chunk; what the client sent adds the sockets' buffers
    assert sent < 32 * 2**20, sent


def test_a_body_of_exactly_the_limit_is_read(live: Any):
    body = json.dumps({"prompt": "Hallo", "max_tokens": 1, "pad": ""}).encode()
    body = body[:-2] + b" " * (MAX_BODY_BYTES - len(body)) + body[-2:]
    assert len(body) == MAX_BODY_BYTES
    assert post(live.port, body)[0] == 200
    status, _, answer = post(live.port, body[:-2] + b" " + body[-2:])
    assert_error(answer, 413, status, "at most")


# ------------------------------------------------------------------------------------ prompts and stop strings

def test_a_huge_prompt_is_refused_by_its_characters_without_being_tokenized(live: Any, monkeypatch):
    calls = []
    tokenizer = live.tokenizer

    class Counting:
        def __call__(self, *a: Any, **k: Any) -> Any:
            calls.append(a)
            return tokenizer(*a, **k)

        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

    monkeypatch.setattr(live, "tokenizer", Counting())
    status, _, answer = post(live.port, {"prompt": "De trein naar Utrecht " * 40_000})  # 880k characters
    assert_error(answer, 400, status, f"context is {CONTEXT} tokens")
    assert answer["error"]["code"] == "context_length_exceeded" and "880000 characters" in answer["error"]["message"]
    # too many prompts for the batch: refused before a prompt is looked at
    status, _, answer = post(live.port, {"prompt": ["Hallo"] * 3, "n": 2})
    assert_error(answer, 400, status, "--batch-size")
    assert calls == []


def test_the_character_bound_never_refuses_a_prompt_that_fits(live: Any):
    longest = max(map(len, live.tokenizer.get_vocab()))
    assert live.max_prompt_chars == CONTEXT * longest
    # the longest vocabulary entry, repeated: as many characters per token as any text has
    token = max(live.tokenizer.get_vocab(), key=len)
    prompt = live.tokenizer.convert_tokens_to_string([token]) * (CONTEXT // 2)
    ids = live.tokenizer(prompt)["input_ids"]
    status, _, answer = post(live.port, {"prompt": prompt, "max_tokens": 1})
    if len(ids) < CONTEXT:
        assert status == 200, answer
    else:
        assert status == 400 and "tokens" in answer["error"]["message"]  # refused by its tokens, not characters


def test_tokenizing_runs_off_the_event_loop(live: Any, monkeypatch):
    """A slow tokenizer does not stop /health from answering (the loop goes on while a prompt is tokenized)."""
    tokenizer = live.tokenizer
    started, release = threading.Event(), threading.Event()

    class Slow:
        def __call__(self, *a: Any, **k: Any) -> Any:
            started.set()
            release.wait(10)
            return tokenizer(*a, **k)

        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

    monkeypatch.setattr(live, "tokenizer", Slow())
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(answer=post(live.port, {"prompt": "Hallo",
                                                                                   "max_tokens": 2})))
    thread.start()
    assert started.wait(10)
    t0 = time.monotonic()
    status, _, health = send(live.port, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and time.monotonic() - t0 < 5
    release.set()
    thread.join(timeout=30)
    assert result["answer"][0] == 200


STOP_CASES = [  # (id, stops, text fed in pieces, the text up to the first stop)
    ("none", [], ["abc", "def"], "abcdef"),
    ("in one piece", ["cd"], ["abcdef"], "ab"),
    ("across pieces", ["cde"], ["ab", "c", "d", "ef"], "ab"),
    ("the earliest of two", ["ef", "bcd"], ["abcdefg"], "a"),
    ("the first to complete wins", ["abcdx", "bc"], ["a", "b", "c", "d", "x"], "a"),
    ("a self-overlapping stop", ["aab"], ["a", "a", "a", "a", "b"], "aa"),
    ("a false start then the stop", ["abab"], ["abaa", "babab"], "aba"),
    ("never complete", ["xyz"], ["xy", "x", "y"], "xyxy"),
    ("unicode", ["\u00e9\u00e9"], ["caf\u00e9", "\u00e9 ok"], "caf"),
]


@pytest.mark.parametrize(("stops", "pieces", "cut"), [c[1:] for c in STOP_CASES], ids=[c[0] for c in STOP_CASES])
def test_stop_matching_finds_the_first_stop_string(stops: list[str], pieces: list[str], cut: str):
    matcher = StopMatcher(stops)
    text, found = "", None
    for piece in pieces:
        at = matcher.feed(piece)
        text += piece
        if at is not None:
            found = at
            break
    assert text[:found] == cut if found is not None else text == cut
    # the same as searching the whole text for each stop string, earliest end first
    ends = sorted((text.find(s) + len(s), text.find(s)) for s in stops if s in text)
    assert found == (min(start for end, start in ends if end == ends[0][0]) if ends else None)


class _CharTokenizer:
    """One token per character (ids are code points): a TextStream that needs no vocabulary."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def test_stop_matching_is_linear_in_the_text():
    """Four stop strings of the longest allowed length that almost match everywhere: each token costs the same
    however much text came before (a rescan would cost the text's length per token)."""
    stops = ["a" * (MAX_STOP_CHARS - 1) + c for c in "bcde"]

    def run(n: int) -> float:
        best = float("inf")
        for _ in range(3):  # the best of three: a busy machine slows single runs, never speeds them
            stream = TextStream(_CharTokenizer(), stops)
            t0 = time.perf_counter()
            released = sum(len(stream.add(ord("a"))) for _ in range(n))
            best = min(best, time.perf_counter() - t0)
            assert released == max(0, n - (MAX_STOP_CHARS - 1)) and not stream.stopped  # the rest is held back
        return best

    short, long = run(2_000), run(8_000)
    assert long < 4 * short * 2.5  # 4x the text: about 4x the time, nowhere near 16x


def test_a_stop_string_held_back_is_released_when_it_does_not_complete():
    stream = TextStream(_CharTokenizer(), ["abc"])
    assert [stream.add(ord(c)) for c in "xab"] == ["x", "", ""]
    assert stream.add(ord("x")) == "abx" and stream.finish() == ""
    stream = TextStream(_CharTokenizer(), ["abc"])
    assert "".join(stream.add(ord(c)) for c in "xyab") == "xy" and stream.finish() == "ab"  # the end: all of it
    stream = TextStream(_CharTokenizer(), ["abc"])
    assert "".join(stream.add(ord(c)) for c in "xyabcz") == "xy" and stream.stopped and stream.text == "xy"


# ------------------------------------------------------------------------------------------- Host allowlist

HOSTS = [  # (id, Host header or None for none, allowed)
    ("127.0.0.1 with its port", "127.0.0.1:{port}", True),
    ("127.0.0.1", "127.0.0.1", True),
    ("localhost", "localhost:{port}", True),
    ("LOCALHOST", "LOCALHOST", True),
    ("[::1]", "[::1]:{port}", True),
    ("a rebinding name", "evil.example:{port}", False),
    ("a name ending in localhost", "evil-localhost", False),
    ("localhost as a subdomain", "localhost.evil.example", False),
    ("another loopback address", "127.0.0.2", False),
    ("the wildcard address", "0.0.0.0", False),
    ("empty", "", False),
    ("garbage", "[not-an-address]", False),
    ("missing", None, None),  # refused by the HTTP server itself (HTTP/1.1 needs a Host), in its own words
]


@pytest.mark.parametrize(("host", "allowed"), [h[1:] for h in HOSTS], ids=[h[0] for h in HOSTS])
def test_only_loopback_names_are_answered_by_default(live: Any, host: str | None, allowed: bool):
    header = None if host is None else host.format(port=live.port)
    for method, path in (("GET", "/health"), ("GET", "/"), ("GET", "/v1/model_card")):
        status, _, answer = send(live.port, method, path, headers={"Host": header})
        if allowed:
            assert status == 200, answer
        elif allowed is None:
            assert status == 400
        else:
            assert_error(answer, 400, status, "--allowed-hosts")
            assert answer["error"]["code"] == "host_not_allowed"
    status, _, answer = post(live.port, {"prompt": "Hallo", "max_tokens": 1}, Host=header)
    assert status == (200 if allowed else 400)


def test_allowed_hosts_extend_the_list_and_a_star_allows_any(tiny_model: Path):
    hosts = host_allowlist("0.0.0.0", "GPU-box, gpu-box.lan,10.0.0.5,::2,*.lan")
    assert hosts == ["localhost", "127.0.0.1", "[::1]", "0.0.0.0", "gpu-box", "gpu-box.lan", "10.0.0.5", "[::2]",
                     "*.lan"]
    with running(tiny_model, hosts) as server:
        for host, status in (("gpu-box:8000", 200), ("10.0.0.5", 200), ("[::2]:1", 200), ("x.lan", 200),
                             ("127.0.0.1", 200), ("gpu-box.example", 400), ("10.0.0.6", 400)):
            assert send(server.port, "GET", "/health", headers={"Host": host})[0] == status, host
    with running(tiny_model, host_allowlist("127.0.0.1", "*")) as server:
        assert send(server.port, "GET", "/health", headers={"Host": "anything.example"})[0] == 200


BAD_HOST_FLAGS = [  # (id, --allowed-hosts, words of the message)
    ("a URL", "http://gpu-box", "not a host name"),
    ("a port", "gpu-box:8000", "without a port"),
    ("a space", "gpu box", "not a host name"),
    ("a star inside", "gpu.*.lan", "not a host name"),
    ("a bare star-dot", "*.", "not a host name"),
    ("a path", "gpu-box/x", "not a host name"),
    ("an empty entry", "gpu-box,,x", "not a host name"),
]


@pytest.mark.parametrize(("value", "words"), [b[1:] for b in BAD_HOST_FLAGS], ids=[b[0] for b in BAD_HOST_FLAGS])
def test_a_bad_allowed_hosts_entry_is_one_line(value: str, words: str):
    with pytest.raises(UsageError, match="--allowed-hosts") as e:
        ServeConfig(allowed_hosts=value)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_serve_command_takes_allowed_hosts(cli):
    rc, _, err = cli("serve", "--allowed-hosts", "gpu-box:8000", "--port", "0")
    assert rc == 2 and "--allowed-hosts: 'gpu-box:8000' is not a host name" in err and "Traceback" not in err


# -------------------------------------------------------------------------------------------- content type

CONTENT_TYPES = [  # (id, Content-Type or None, accepted)
    ("application/json", "application/json", True),
    ("with a charset", "application/json; charset=utf-8", True),
    ("upper case", "Application/JSON", True),
    ("text/plain", "text/plain", False),
    ("text/plain with a charset", "text/plain;charset=UTF-8", False),
    ("a form", "application/x-www-form-urlencoded", False),
    ("multipart", "multipart/form-data; boundary=x", False),
    ("none", None, False),
    ("empty", "", False),
    ("json-ish", "application/jsonp", False),
]


@pytest.mark.parametrize(("content_type", "accepted"), [c[1:] for c in CONTENT_TYPES],
                         ids=[c[0] for c in CONTENT_TYPES])
def test_a_post_needs_the_json_content_type(live: Any, content_type: str | None, accepted: bool):
    """A body a web page may send to 127.0.0.1 without a preflight (text/plain, a form, no type) runs nothing."""
    before = live.engine.stats()
    raw = json.dumps({"prompt": "Hallo", "max_tokens": 1}).encode()
    status, _, answer = send(live.port, "POST", "/v1/completions", raw, {"Content-Type": content_type})
    if accepted:
        assert status == 200, answer
    else:
        assert_error(answer, 415, status, "Content-Type: application/json")
        assert answer["error"]["code"] == "unsupported_media_type"
        assert live.engine.stats() == before


# ------------------------------------------------------------------------------------------ no local paths

PATHS = [  # (id, a library's message, what a client sees)
    ("POSIX", "No such file: /home/anna/runs/x/final_model/model.safetensors", "No such file: <path>"),
    ("quoted", "cannot open '/srv/models/a b.bin'", "cannot open '<path> b.bin'"),
    ("home", "see ~/runs/x", "see <path>"),
    ("Windows", r"C:\Users\anna\model.bin is locked", "<path> is locked"),
    ("in brackets", "(/tmp/x.py, line 3)", "(<path>, line 3)"),
    ("a URL stays", "see https://huggingface.co/docs/x", "see https://huggingface.co/docs/x"),
    ("a ratio stays", "CUDA out of memory (3/4 used)", "CUDA out of memory (3/4 used)"),
    ("a lone slash stays", "tokens / s", "tokens / s"),
]


@pytest.mark.parametrize(("message", "shown"), [p[1:] for p in PATHS], ids=[p[0] for p in PATHS])
def test_paths_in_a_library_message_are_not_shown_to_clients(message: str, shown: str):
    assert public(message) == shown


def test_a_failed_generation_does_not_send_a_local_path(tiny_model: Path, monkeypatch):
    from gpt2_dutch.serve.engine import Engine

    def faulty(self, groups):  # noqa: ANN001, ANN202
        raise RuntimeError(f"cannot map {tiny_model}/model.safetensors")

    monkeypatch.setattr(Engine, "_prefill", faulty)
    with running(tiny_model) as server:
        for stream in (False, True):
            status, _, answer = post(server.port, {"prompt": "Hallo", "max_tokens": 2, "stream": stream})
            text = json.dumps(answer)
            assert str(tiny_model.parent) not in text and "cannot map <path>" in text
            assert status == (500 if not stream else 200)


def test_no_error_answer_names_a_local_path(live: Any, tiny_model: Path):
    answers = [post(live.port, m[1])[2] for m in MALFORMED[:12]]
    answers += [send(live.port, "GET", "/v1/nothing")[2], send(live.port, "GET", "/v1/model_card")[2],
                send(live.port, "GET", "/health", headers={"Host": "evil.example"})[2]]
    text = json.dumps(answers)
    assert str(tiny_model.parent) not in text and str(Path.home()) not in text and '"/' not in text
