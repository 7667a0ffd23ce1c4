"""Serving: `gpt2-dutch serve` under 1, 4 and 16 concurrent streaming clients, next to the same server answering
one request at a time (--batch-size 1), and `transformers serve` (plain and --continuous-batching) on the same model.

Each server runs as its own process (`python -m gpt2_dutch serve`), the clients are threads of this process
speaking plain HTTP (http.client) to it on loopback, so what is measured is what a user of the API gets: time to
first token (the first streamed chunk), latency of whole requests (p50, p95), and aggregate tokens/s over the
load (every token received by every client / the wall time from the first request sent to the last token).
Our requests use `ignore_eos` so that each one makes exactly max_tokens tokens (transformers serve refuses that
field; an untrained model rarely ends a text early anyway). The server's CPU seconds are read from /proc too:
tokens per CPU second is a figure that other work on a shared machine does not skew.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gpt2_dutch.bench.report import say

PROMPTS = ["Amsterdam is een stad waar veel mensen op de fiets naar hun werk gaan, ook als het regent, en",
           "Het weer in Nederland is vaak wisselvallig: in de ochtend schijnt de zon, maar in de middag",
           "Er was eens een kleine molenaar die aan de rand van een dorp woonde, vlak bij de rivier, en",
           "De trein naar Utrecht vertrekt om kwart over negen van spoor vijf, maar vandaag is hij"]
CLIENTS = (1, 4, 16)
# Every server measured, ours first (the ratios are ours over each); --servers picks some of them.
SERVERS = ("ours", "one_at_a_time", "transformers_serve", "transformers_serve_cb")


def bench_serve(tokenizer_dir: str, tmp: Path, quick: bool, names: tuple[str, ...] = SERVERS) -> dict[str, Any]:
    """Each server of `names` at 1, 4 and 16 clients; ratios at 16 clients."""
    model_dir = _model(tokenizer_dir, tmp, "tiny" if quick else "small")
    max_tokens, per_client = (16, 1) if quick else (64, 2)
    out: dict[str, Any] = {"model_size": "tiny" if quick else "small", "max_tokens": max_tokens,
                           "requests_per_client": per_client, "clients": list(CLIENTS), "servers": {}}
    for name, command, body in (server for server in servers(model_dir) if server[0] in names):
        say(f"serve: {name} ({' '.join(command[command.index('--port') + 2:]) or 'defaults'})")
        try:
            with _server(command, body, max_tokens) as server:
                runs = {}
                for clients in CLIENTS:
                    # the baselines answer 16 clients one after the other: one request each is enough to see it
                    reqs = per_client if name == "ours" or clients == 1 else 1
                    cpu = server.cpu_s()
                    r = load(server.port, clients, reqs, max_tokens, body)
                    r["server_cpu_s"] = server.cpu_s() - cpu if cpu is not None else None
                    r["tokens_per_server_cpu_s"] = r["tokens"] / r["server_cpu_s"] if r["server_cpu_s"] else None
                    runs[str(clients)] = r
                    say(f"  {clients:>2} clients: {r['tokens_per_s']:.1f} tokens/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms"
                        f", latency p50 {r['latency_p50_s']:.2f} s, p95 {r['latency_p95_s']:.2f} s")
        except (OSError, RuntimeError) as e:  # a baseline that cannot run here is reported, not fatal
            out["servers"][name] = {"error": str(e).splitlines()[0][:300]}
            say(f"  {name} could not be measured: {out['servers'][name]['error']}")
            continue
        out["servers"][name] = runs
    ours, top = out["servers"]["ours"], str(CLIENTS[-1])
    out["ours_16_over_1"] = ours[top]["tokens_per_s"] / ours["1"]["tokens_per_s"]
    for name, runs in out["servers"].items():
        if name != "ours" and "error" not in runs:
            out[f"ours_over_{name}_at_16"] = ours[top]["tokens_per_s"] / runs[top]["tokens_per_s"]
    say(f"serve: ours, 16 clients / 1 client: {out['ours_16_over_1']:.1f}x; at 16 clients, ours / " + ", ".join(
        f"{k[len('ours_over_'):-len('_at_16')]} {v:.1f}x" for k, v in out.items() if k.startswith("ours_over_")))
    return out


def servers(model_dir: Path) -> list[tuple[str, list[str], dict[str, Any]]]:
    """(name, command, extra request fields) of each server measured."""
    ours = [sys.executable, "-m", "gpt2_dutch", "serve", "--model-path", str(model_dir), "--max-queue", "1000",
            "--port"]
    # transformers serve: the model by its local path, offline; it refuses fields it does not know (ignore_eos)
    hf = [str(Path(sys.executable).with_name("transformers")), "serve", str(model_dir), "--device", "cpu", "--port"]
    hf_body = {"model": str(model_dir)}
    return [("ours", [*ours, "{port}", "--batch-size", "32"], {"ignore_eos": True}),
            ("one_at_a_time", [*ours, "{port}", "--batch-size", "1"], {"ignore_eos": True}),
            ("transformers_serve", [*hf, "{port}"], hf_body),
            ("transformers_serve_cb", [*hf, "{port}", "--continuous-batching"], hf_body)]


def _model(tokenizer_dir: str, tmp: Path, size: str) -> Path:
    """A GPT-2 of `size` with random weights (speed does not depend on their values), saved as a final_model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt2_dutch.model.presets import gpt2_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_dir = tmp / f"serve-{size}" / "final_model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(gpt2_config(size, len(tok), 1024, tok.eos_token_id)).save_pretrained(model_dir)
    tok.save_pretrained(str(model_dir))
    return model_dir


class _server:
    """A server process on a free loopback port (`{port}` in its command), warmed up, stopped on exit."""

    def __init__(self, command: list[str], body: dict[str, Any], warmup_tokens: int = 4):
        self.command, self.body, self.warmup_tokens = command, body, warmup_tokens

    def __enter__(self) -> _server:
        self.port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([c.replace("{port}", str(self.port)) for c in self.command], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_healthy(self.port, self.proc)
            # warm-up: one whole request at the measured length (the first passes at each cache length allocate and
            # pick kernels; with a 4-token warm-up the first measured client paid for that, ~8% of its CPU time)
            load(self.port, 1, 1, self.warmup_tokens, self.body)
        except BaseException:
            self.__exit__()
            raise
        return self

    def cpu_s(self) -> float | None:
        """CPU seconds the server process has used (Linux): on a shared machine, a figure others cannot skew."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    """Until GET /health (or /v1/models: transformers serve has no /health) answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            for path in ("/health", "/v1/models"):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", path)
                if conn.getresponse().status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server on port {port} did not answer /health within {timeout:.0f} s")


def stream_completion(port: int, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """One streamed completion over plain HTTP: its text, tokens, time to the first token's chunk, latency."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True,
                                                        "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, tokens, text, usage = None, 0, [], None
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        usage = event.get("usage") or usage
        for choice in event.get("choices", []):
            if choice.get("finish_reason") is None:  # transformers serve leaves it out until the end
                tokens += 1
                first = first or time.perf_counter()
            text.append(choice["text"])
    conn.close()
    end = time.perf_counter()
    # The usage count where the server gives it: transformers serve sends no chunk for a token whose text is not
    # yet whole UTF-8 (an untrained model's byte tokens: often none at all), ours one chunk per token.
    tokens = usage["completion_tokens"] if usage else tokens
    return {"text": "".join(text), "tokens": tokens, "ttft_s": (first or end) - start, "latency_s": end - start,
            "end": end}


def load(port: int, clients: int, requests_per_client: int, max_tokens: int, extra: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """`clients` threads, each sending `requests_per_client` streamed requests one after the other."""
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for _ in range(requests_per_client):
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
                    **(extra or {})}
            try:
                r = stream_completion(port, body)
            except (OSError, RuntimeError) as e:
                with lock:
                    errors.append(str(e))
                return
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    wall = max(r["end"] for r in results) - start
    lat = sorted(r["latency_s"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "seconds": wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_ms": 1000 * statistics.median(r["ttft_s"] for r in results),
            "ttft_p95_ms": 1000 * _quantile(sorted(r["ttft_s"] for r in results), 0.95),
            "latency_p50_s": statistics.median(lat), "latency_p95_s": _quantile(lat, 0.95)}


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
