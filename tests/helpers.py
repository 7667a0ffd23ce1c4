"""Plain helpers for the tests (no fixtures: those are in conftest.py): the test documents, the one-line error
check, a CLI runner, and small readers of what preprocess, train and serve write. Tests import them
(`from helpers import DOCS`); tests never import each other."""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from gpt2_dutch.__main__ import main

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
GPT2_DIR = SHARED / "gpt2-tokenizer"
DUTCH_CORPUS = SHARED / "dutch" / "train.jsonl.gz"

DOCS = [
    "De trein naar Utrecht vertrekt om kwart over negen van spoor vijf.",
    "Het regent al de hele week in Groningen, maar morgen wordt het droog en zonnig.",
    "Oma bakt elke zondag appeltaart met kaneel en rozijnen voor de kleinkinderen.",
    "De gemeenteraad heeft besloten om een nieuwe fietsbrug over de rivier te bouwen.",
    "Zet de oven op tweehonderd graden en laat het deeg een halfuur rusten.",
    "\u201cWaar is mijn fiets?\u201d vroeg Sanne. \u201cIk weet het niet,\u201d zei haar broer.",
    "In de zeventiende eeuw was Amsterdam een van de rijkste steden van Europa.",
    "De bibliotheek is op maandag gesloten en op zaterdag open tot vijf uur.",
    "Kinderen leren op school lezen, schrijven en rekenen, en later ook Engels.",
    "Na de storm lagen er overal takken op straat en was de stroom uitgevallen.",
    "Het museum toont schilderijen van Vermeer, Rembrandt en Van Gogh.",
    "Wie een huis wil kopen, moet eerst een hypotheek aanvragen bij de bank.",
]


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path



def assert_one_line_error(rc: int, err: str, message: str, code: int = 2) -> None:
    """Exit `code` (2: the user's input; 1: the machine, e.g. a full disk), the message on one final `error:`
    line (progress bars may precede it), no traceback."""
    assert rc == code, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and "error: " in lines[-1] and message in lines[-1], err
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in err, err


class CLI:
    def __init__(self, capsys: pytest.CaptureFixture[str]):
        self.capsys = capsys

    def __call__(self, *args: str | Path) -> tuple[int, str, str]:
        self.capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse exits by itself on a bad flag
            rc = e.code if isinstance(e.code, int) else 1
        out, err = self.capsys.readouterr()
        return rc, out, err


def poison_training_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the `step`-th training forward's loss NaN (the health guard must skip that update).

    With the chunked loss (--loss-chunk-tokens) the loss is computed from the hidden states, so those are poisoned.
    """
    import functools

    from transformers import GPT2LMHeadModel

    forward, calls = GPT2LMHeadModel.forward, {"n": 0}

    @functools.wraps(forward)  # the Trainer reads the signature: with `labels` in it, it evaluates the loss
    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == step:
                if out.loss is not None:
                    out.loss = out.loss * float("nan")
                else:
                    out.hidden_states = tuple(h * float("nan") for h in out.hidden_states)
        return out

    monkeypatch.setattr(GPT2LMHeadModel, "forward", poisoned)


# ---------------------------------------------------------------------------------------------- preprocess

def run_preprocess(tmp_path: Path, files: list[Path] | Path, tokenizer: Path | None, **kw) -> Path:
    from gpt2_dutch.preprocess import PreprocessConfig, preprocess

    files = files if isinstance(files, list) else [files]
    cfg = PreprocessConfig(data_files=[str(f) for f in files], output_dir=str(tmp_path / "out"),
                           tokenizer=str(tokenizer) if tokenizer else None, **kw)
    return preprocess(cfg)


def all_ids(path: Path, split: str) -> np.ndarray:
    import numpy as np
    from datasets import load_from_disk

    return np.asarray(load_from_disk(str(path / split))["input_ids"])


def make_hub_like(root: Path, test_docs: list[str]) -> Path:
    """A local dataset laid out like the Hub's (configs in README.md) so `datasets.load_dataset` reads it."""
    (root / "10k").mkdir(parents=True)
    write_jsonl(root / "10k" / "train.jsonl", DOCS * 6)
    write_jsonl(root / "10k" / "test.jsonl", test_docs)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: 10k\n  data_files:\n  - split: train\n    path: 10k/train.jsonl\n"
        "  - split: test\n    path: 10k/test.jsonl\n---\n")
    return root


TINY_PART_MB = 0.001  # 1 KB parts: the test corpora become dozens of parts

# Distinct documents of varied length: a mix-up of two documents or parts would show in the ids.
CORPUS = [f"Document {i}. " + " ".join(random.Random(i).choices(DOCS, k=1 + i % 4)) for i in range(240)]


def chunks(path: Path) -> dict[str, np.ndarray]:
    import numpy as np
    from datasets import load_from_disk

    return {split: np.asarray(load_from_disk(str(path / split))["input_ids"]) for split in ("train", "test")}


def splits(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())["splits"]


def assert_same_dataset(a: Path, b: Path) -> None:
    import numpy as np

    ca, cb = chunks(a), chunks(b)
    for split in ("train", "test"):
        assert ca[split].shape == cb[split].shape and np.array_equal(ca[split], cb[split]), split
    assert splits(a) == splits(b)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def run(out: Path, files: list[Path], tok: Path, name: str = "d", **kw) -> Path:
    """preprocess `files` into `out` with 16-token chunks."""
    from gpt2_dutch.preprocess import PreprocessConfig, preprocess

    return preprocess(PreprocessConfig(data_files=[str(f) for f in files], tokenizer=str(tok), chunk_size=16,
                                       output_dir=str(out), name=name, **kw))


# ---------------------------------------------------------------------------------------------- train, card

TINY = ["--model-size", "tiny", "--batch-size", "4", "--precision", "fp32"]
# for tests that only need a run in another process (signals, kills, ranks): Muon's Newton-Schulz on nano's
# 128-wide matrices costs a quarter of tiny's, and these tests pay it in every process they start
NANO = ["--model-size", "nano", "--batch-size", "4", "--precision", "fp32"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def front(card: str) -> dict:
    """The YAML between the card's two `---` lines."""
    import yaml

    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


# ---------------------------------------------------------------------------------------------- serve

PROMPTS = ["De trein naar Utrecht", "Het regent al de hele week", "Oma bakt elke zondag"]
SERVED_STEPS = 4  # conftest's `served_run`: trained this many steps, evaluated half-way and at the end


class Live:
    """A running server: its base URL, port and the Server object (model, tokenizer, engine)."""

    def __init__(self, server: Any, port: int):
        self.server, self.port = server, port
        self.url = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        try:
            parsed = json.loads(payload)
        except ValueError:
            parsed = payload.decode("utf-8", "replace")
        return resp.status, dict(resp.getheaders()), parsed

    def complete(self, **body: Any) -> dict[str, Any]:
        status, _, answer = self.request("POST", "/v1/completions", body)
        assert status == 200, answer
        return answer

    def stream(self, **body: Any) -> list[Any]:
        """The parsed server-sent events of a streamed completion, '[DONE]' included."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("content-type").startswith("text/event-stream")
        events = [line[6:] for line in resp.read().decode("utf-8").split("\n\n") if line.startswith("data: ")]
        conn.close()
        return [e if e == "[DONE]" else json.loads(e) for e in events]

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(model_path: Path, **kwargs: Any) -> Iterator[Live]:
    """uvicorn on a free loopback port in a thread of this process, stopped on exit."""
    import uvicorn

    from gpt2_dutch.serve import build_server
    from gpt2_dutch.serve.app import create_app

    server = build_server(str(model_path), device="cpu", precision="fp32", **kwargs)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Live(server, port)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def greedy_generate(loaded: Any, prompts: list[str], max_tokens: int) -> list[str]:
    from gpt2_dutch.generate import GenerateConfig
    from gpt2_dutch.generate.sampling import generate_texts

    model, tok, _ = loaded
    cfg = GenerateConfig(model_path="-", max_new_tokens=max_tokens, greedy=True)
    return [c[0] for c in generate_texts(model, tok, prompts, cfg)]


def random_model_dir(out: Path, tokenizer_dir: Path, context: int = 64, **config: Any) -> Path:
    """An untrained GPT-2 (by default one layer, width 32) with the tokenizer at `tokenizer_dir`, saved as a
    final_model directory at `out`: for the tests that need a model to load, not a trained one."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    settings = dict(vocab_size=len(tok), n_positions=context, n_embd=32, n_layer=1, n_head=2,
                    bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(GPT2Config(**{**settings, **config})).save_pretrained(out)
    tok.save_pretrained(out)
    return out
