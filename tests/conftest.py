"""Shared fixtures: a small Dutch corpus written for these tests, tokenizers, a CLI runner, and the trained runs and
models that several files use, built once per session. Plain helpers live in helpers.py."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

# One torch thread in this process and in every child (set before torch is imported): the tests' models are tiny,
# so a thread pool's wake-ups cost more than the matmuls, and on a busy CI machine far more (see test_muon's
# _one_thread). A value set by whoever runs the tests wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The names tests used to import from this file, for tests written before helpers.py (new tests: `from helpers`)
from helpers import (  # noqa: F401
    CLI,
    DOCS,
    DUTCH_CORPUS,
    GPT2_DIR,
    SERVED_STEPS,
    SHARED,
    assert_one_line_error,
    poison_training_step,
    write_jsonl,
)


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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Path) -> Path:
    """A processed dataset of the test documents: 300-token BPE, 32-token chunks (~50 train chunks)."""
    from gpt2_dutch.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("tiny_dataset")
    corpus = write_jsonl(root / "corpus.jsonl", DOCS * 8)
    return preprocess(PreprocessConfig(data_files=[str(corpus)], tokenizer=str(small_tokenizer), chunk_size=32,
                                       output_dir=str(root / "out"), name="tiny"))


@pytest.fixture
def no_hang():
    """A read that blocks (a FIFO without a writer, an endless device) fails the test instead of hanging it."""
    import signal

    def expired(signum, frame):
        raise TimeoutError("the read did not return within 20 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CLI:
    return CLI(capsys)


@pytest.fixture
def mixed_files(tmp_path: Path) -> list[Path]:
    """The corpus spread over every kind of input: .jsonl, .jsonl.gz, .txt by paragraph, .parquet, .json."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import CORPUS

    d = tmp_path / "in"
    d.mkdir()
    a = write_jsonl(d / "a.jsonl", CORPUS[:80])
    b = d / "b.jsonl.gz"
    b.write_bytes(gzip.compress(write_jsonl(d / "tmp.jsonl", CORPUS[80:140]).read_bytes()))
    (d / "tmp.jsonl").unlink()
    c = d / "c.txt"
    c.write_text("\n\n".join(CORPUS[140:190]) + "\n")
    e = d / "e.parquet"
    pq.write_table(pa.table({"text": CORPUS[190:220]}), e)
    f = d / "f.json"
    f.write_text(json.dumps([{"text": t} for t in CORPUS[220:]], ensure_ascii=False))
    return [a, b, c, e, f]


# ------------------------------------------------------------------------------- trained models, once per session

@pytest.fixture(scope="session")
def tiny_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `nano` GPT-2 trained for 300 steps until it knows the test documents by heart (continuations are asserted),
    evaluated and saved every 100 steps; test_run.py checks its run directory. Read it, never change it.
    nano rather than tiny: Muon's Newton-Schulz on tiny's 256-wide matrices made this fixture 78 s, nano's 28 s."""
    from gpt2_dutch.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs")
    return train(TrainConfig(dataset_path=str(tiny_dataset), model_size="nano", batch_size=4, precision="fp32",
                             output_dir=str(out), max_steps=300, learning_rate=3e-3, eval_every=100,
                             save_every=100))


@pytest.fixture(scope="session")
def loaded(tiny_run: Path):  # noqa: ANN201 - (model, tokenizer, model_dir)
    from gpt2_dutch.model.loading import load_model

    return load_model(tiny_run, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def long_context_model(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> Path:
    """An untrained tiny GPT-2 with a 4096-token context that never samples <|endoftext|>: generations long enough
    to interrupt (an untrained model ends a text after ~300 tokens on average, sometimes before Ctrl-C arrives)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from gpt2_dutch.model.presets import gpt2_config

    tok = AutoTokenizer.from_pretrained(tiny_run / "final_model")
    out = tmp_path_factory.mktemp("long") / "final_model"
    AutoModelForCausalLM.from_config(gpt2_config("nano", len(tok), 4096, tok.eos_token_id)).save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id, suppress_tokens=[tok.eos_token_id]).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def served_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 trained for 4 steps at the default learning rate, logged every step, evaluated at 2 and 4, saved
    at 4, --license mit: a real run directory for serve and for the model card's tests (serve's answers are compared
    with `generate` on the same model, so it need not have learnt anything). Read it, never change it."""
    from gpt2_dutch.train import TrainConfig, train

    out = tmp_path_factory.mktemp("serve_runs")
    return train(TrainConfig(dataset_path=str(tiny_dataset), model_size="tiny", batch_size=4, precision="fp32",
                             output_dir=str(out), max_steps=SERVED_STEPS, eval_every=SERVED_STEPS // 2,
                             save_every=SERVED_STEPS, log_every=1, license="mit", quiet=True))


@pytest.fixture(scope="session")
def served_loaded(served_run: Path):  # noqa: ANN201 - (model, tokenizer, model_dir)
    """`served_run` loaded as `generate` loads it."""
    from gpt2_dutch.model.loading import load_model

    return load_model(served_run, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def long_model(served_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny GPT-2 with a 2048-token context: long requests (with ignore_eos: untrained, it samples
    <|endoftext|> about once in 300 tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from gpt2_dutch.model.presets import gpt2_config

    tok = AutoTokenizer.from_pretrained(served_run / "final_model")
    out = tmp_path_factory.mktemp("long") / "final_model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(gpt2_config("tiny", len(tok), 2048, tok.eos_token_id)).save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out

