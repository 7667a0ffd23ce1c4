"""Shared fixtures: a small Dutch corpus written for these tests, tokenizers, and a CLI runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpt2_dutch.__main__ import main

# One torch thread in this process and in every child (set before torch is imported): the tests' models are tiny,
# so a thread pool's wake-ups cost more than the matmuls, and on a busy CI machine far more (see test_muon's
# _one_thread). A value set by whoever runs the tests wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
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


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own `datasets` cache: a stale cache entry must never make a test pass."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture
def docs() -> list[str]:
    return list(DOCS)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """The test documents, repeated so that both splits hold several chunks, as .jsonl."""
    return write_jsonl(tmp_path / "corpus.jsonl", DOCS * 8)


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    if not (GPT2_DIR / "vocab.json").is_file():
        pytest.skip("the English GPT-2 BPE files (../shared/data/gpt2-tokenizer) are not present")
    return GPT2_DIR


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-token Dutch BPE trained on the test documents and saved as a tokenizer directory."""
    from gpt2_dutch.data.tokenizer import train_bpe

    tok = train_bpe(iter(DOCS * 4), 300, show_progress=False)
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(out))
    return out


def assert_one_line_error(rc: int, err: str, message: str, code: int = 2) -> None:
    """Exit `code` (2: the user's input; 1: the machine, e.g. a full disk), the message on one final `error:`
    line (progress bars may precede it), no traceback."""
    assert rc == code, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and "error: " in lines[-1] and message in lines[-1], err
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in err, err


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Path) -> Path:
    """A processed dataset of the test documents: 300-token BPE, 32-token chunks (~50 train chunks)."""
    from gpt2_dutch.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("tiny_dataset")
    corpus = write_jsonl(root / "corpus.jsonl", DOCS * 8)
    return preprocess(PreprocessConfig(data_files=[str(corpus)], tokenizer=str(small_tokenizer), chunk_size=32,
                                       output_dir=str(root / "out"), name="tiny"))


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


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CLI:
    return CLI(capsys)


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
