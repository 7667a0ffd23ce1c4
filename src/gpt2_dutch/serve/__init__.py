"""Serve a trained model over HTTP: an OpenAI-compatible completions API with continuous batching, and a playground.

    gpt2-dutch serve --model-path trained_models/gpt2-dutch-small-latest    # http://127.0.0.1:8000/
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "Er was eens", "max_tokens": 40, "temperature": 0.8, "stream": true}'
    python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
        print(c.completions.create(model='gpt2-dutch', prompt='Amsterdam is', max_tokens=20).choices[0].text)"

POST /v1/completions takes the OpenAI fields prompt (a string or a list), max_tokens, temperature (0: greedy),
top_p, n, stop, seed, stream (server-sent events, one chunk per token, then `data: [DONE]`), echo, logprobs,
presence_penalty, frequency_penalty and logit_bias, and returns usage counts; top_k is an extension. With echo,
logprobs and max_tokens 0 it scores a prompt (docs/serve.md, "Scoring"). GET /v1/models, /v1/models/{id},
/health, /v1/model_card, /metrics (Prometheus); POST /tokenize, /detokenize (vLLM's). The playground at /
streams text and shows the model's card (size, training tokens, eval loss, bits per byte, loss curve from its
run).

Requests that arrive while others decode join the running batch at the next decoding step, so concurrent users
share each forward pass (see serve/engine.py). Past --max-queue waiting requests the answer is 503 with
Retry-After; a client that disconnects frees its slot at once; a bad request is a 400 with an OpenAI-style error
body. Weights load from safetensors only; remote code never runs. Binding to anything but loopback prints a
warning: use --api-key (or GPT2_DUTCH_API_KEY) so that every route but /health needs `Authorization: Bearer KEY`.
Only requests whose Host header names localhost, 127.0.0.1, [::1], --host or one of --allowed-hosts are answered,
and a POST body must be sent as application/json: what a web page cannot do to a server on this machine, and the
bounds on what one request may cost, are in docs/serve.md ("Exposure").
"""

# This package is a stage: it imports the foundations (config, errors, model_loading, ...), and only __main__ and
# bench import it. Its modules:
#     __init__.py      ServeConfig and serve(): load the model, bind, run uvicorn
#     engine.py        the continuous-batching scheduler around the model's KV cache, and per-row sampling
#     protocol.py      the completions request checked field by field; OpenAI-style error bodies
#     metrics.py       GET /metrics: prometheus-client counters, gauges and histograms, a registry per server
#     app.py           the FastAPI routes, streaming, auth, the text of each choice (stop strings, UTF-8)
#     card.py          the model card: config.json, and the run's run_config.json and metrics.jsonl
#     playground.html  the page at /: no external resources, works offline
# torch, transformers and fastapi are imported inside functions, so that `gpt2-dutch serve --help` stays light.

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any

from gpt2_dutch.core.errors import UsageError, check
from gpt2_dutch.core.options import option

API_KEY_ENV = "GPT2_DUTCH_API_KEY"
MAX_BATCH = 1024
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the Host names answered by default


@dataclass
class ServeConfig:
    model_path: str = option("trained_models/gpt2-dutch-small-latest/final_model",
                             "a final_model directory, a run directory, or a *-latest link")
    host: str = option("127.0.0.1", "address to bind (anything but loopback prints a warning: use --api-key)")
    port: int = option(8000, "port to listen on (0: any free port, printed at start)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every route but /health (default: "
                                 f"${API_KEY_ENV} when set; unset: no key)")
    allowed_hosts: str | None = option(None, "more names the Host header may carry, comma-separated "
                                       "(gpu-box,gpu-box.lan,10.0.0.5; *.lan for a domain; * for any): by default "
                                       "only localhost, 127.0.0.1, [::1] and --host are answered")
    batch_size: int = option(32, "sequences decoded together in one forward pass (a request takes prompts x n)",
                             aliases=["--max-batch"])
    max_queue: int = option(64, "requests that may wait for a slot; past that the answer is 503 with Retry-After")
    model_name: str | None = option(None, "the model's id in the API (default: the run directory's name)")
    device: str = option("auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)")
    precision: str = option("auto", "weights dtype (auto: bf16 on GPUs and CPUs with fast bf16, else fp32)",
                            choices=["auto", "bf16", "fp16", "fp32"])

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, f"--port must be between 0 and 65535 (got {self.port})")
        check(bool(self.host.strip()), "--host must not be empty")
        check(1 <= self.batch_size <= MAX_BATCH,
              f"--batch-size must be between 1 and {MAX_BATCH} (got {self.batch_size})")
        check(0 <= self.max_queue <= 100_000, f"--max-queue must be between 0 and 100000 (got {self.max_queue})")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        check(self.api_key is None or (bool(self.api_key.strip()) and self.api_key.isprintable()),
              "--api-key must be printable text, not empty")
        check(self.model_name is None or bool(self.model_name.strip()), "--model-name must not be empty")
        host_allowlist(self.host, self.allowed_hosts)  # checked here: a bad name is one line before anything


_HOST_NAME = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")


def _host_pattern(name: str, flag: str) -> str:
    """A name as the Host header carries it, lowercased (an IPv6 address in brackets); one line for anything
    that is not a host name, an IP address, '*.domain' or '*'."""
    name = name.strip().lower()
    if name == "*":
        return name
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        check(len(name) <= 253 and _HOST_NAME.fullmatch(name) is not None,
              f"{flag}: '{name[:80]}' is not a host name, an IP address, '*.domain' or '*' (give names without "
              "a port or scheme)")
        return name
    return f"[{address}]" if address.version == 6 else str(address)


def host_allowlist(host: str, extra: str | None = None) -> list[str]:
    """The Host names the server answers to: the loopback names, the address it is bound to, and `extra`
    (--allowed-hosts, comma-separated). Anything else may be a page on another site that resolves its own name
    to this machine (DNS rebinding)."""
    names = list(LOOPBACK_HOSTS)
    for i, name in enumerate([host, *(extra.split(",") if extra else [])]):
        pattern = _host_pattern(name, "--allowed-hosts" if i else "--host")
        if pattern not in names:
            names.append(pattern)
    return names


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (bound before the model loads its weights, so a taken port fails in a second)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host} cannot be resolved ({e.strerror})") from None
    family, _type, _proto, _name, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}); is another server using it? pass --port") \
            from None
    sock.listen(2048)
    return sock


def model_name(model_dir: Any) -> str:
    """The run directory's name (gpt2-dutch-small-20261126-120000) rather than 'final_model'."""
    model_dir = model_dir.resolve()  # a -latest link names the run it points at
    return (model_dir.parent if model_dir.name == "final_model" else model_dir).name


def build_server(model_path: str, *, device: str = "auto", precision: str = "auto", max_batch: int = 32,
                 max_queue: int = 64, api_key: str | None = None, name: str | None = None) -> Any:
    """A `Server` (model, tokenizer, engine, card) for create_app; the engine starts with the app."""
    from gpt2_dutch.model.loading import load_model
    from gpt2_dutch.serve.app import Server

    model, tokenizer, model_dir = load_model(model_path, device, precision)
    return Server(model, tokenizer, model_dir, name or model_name(model_dir), max_batch, max_queue, api_key)


def serve(cfg: ServeConfig) -> None:
    hosts = host_allowlist(cfg.host, cfg.allowed_hosts)
    sock = bind(cfg.host, cfg.port)
    try:
        if not is_loopback(cfg.host):
            print(f"gpt2-dutch serve: warning: listening on {cfg.host}, not loopback: anyone who can reach this "
                  "machine can use the model" + ("" if cfg.api_key else "; set --api-key to require a key") +
                  ("" if "*" in hosts else f". Only requests that name {', '.join(hosts)} in their Host header are "
                   "answered: add this machine's name or address with --allowed-hosts"),
                  file=sys.stderr, flush=True)
        server = build_server(cfg.model_path, device=cfg.device, precision=cfg.precision, max_batch=cfg.batch_size,
                              max_queue=cfg.max_queue, api_key=cfg.api_key, name=cfg.model_name)
        import uvicorn

        from gpt2_dutch.serve.app import create_app

        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"gpt2-dutch serve: {server.name} on http://{shown}:{port}/ (playground), API at "
              f"http://{shown}:{port}/v1 (batch {cfg.batch_size}, queue {cfg.max_queue}"
              f"{', API key required' if cfg.api_key else ''}); Ctrl-C stops", file=sys.stderr, flush=True)
        config = uvicorn.Config(create_app(server, hosts), log_level="warning", timeout_graceful_shutdown=5)
        # uvicorn shuts down gracefully on Ctrl-C, then re-raises it: here the normal way to stop, not an error
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run(sockets=[sock])
        print("gpt2-dutch serve: stopped", file=sys.stderr, flush=True)
    finally:
        sock.close()
