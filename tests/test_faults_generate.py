"""Every fault of `generate` and `evaluate` in one table: one line on stderr, the right exit status, no traceback.

Each case is a command line (built from the fixtures), optional bytes on stdin (the REPL), the exit status, the
text that must be on one line, and where: `err` for an error or a notice on stderr, `out` for a REPL reply.
Errors (exit 2) are checked with conftest.assert_one_line_error; handled extremes (exit 0) must say what they did
on exactly one line and print no error. The models are random 2-layer GPT-2s with a 32-token context: each case
takes well under a second.
"""

from __future__ import annotations

import gzip
import io
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DOCS, assert_one_line_error, write_jsonl

CONTEXT = 32
HUGE = str(10**30)  # far beyond any int64: Python ints parse it, the code must bound or cap it
LONG_PROMPT = " ".join(DOCS[:3])  # 140 tokens of the 300-token test BPE: more than the context


def _random_model(directory: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)  # the same weights every run: the sampling-overflow cases depend on the logits' signs
    config = GPT2Config(vocab_size=len(tok), n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Path) -> Path:
    """A random model with the test BPE: the tokenizer of the `tiny_dataset` fixture."""
    return _random_model(tmp_path_factory.mktemp("faults_model"), small_tokenizer)


@pytest.fixture(scope="session")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model whose 300-token BPE was trained on other text: same vocabulary size, other ids and merges."""
    from gpt2_dutch.tokenizer import train_bpe

    tok_dir = tmp_path_factory.mktemp("other_tok")
    train_bpe(iter([d[::-1] for d in DOCS] * 4), 300, show_progress=False).save_pretrained(str(tok_dir))
    return _random_model(tmp_path_factory.mktemp("other_model"), tok_dir)


class Faults:
    """The inputs of the cases: the fixtures' paths, and broken copies made on demand in tmp_path."""

    def __init__(self, tmp_path: Path, model: Path, other: Path, dataset: Path):
        self.tmp, self.model, self.other, self.dataset = tmp_path, model, other, dataset

    def file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def weights(self, damage: Callable[[bytes], bytes]) -> Path:
        """A copy of the model whose model.safetensors is damage(the real bytes)."""
        copy = self.tmp / "damaged_model"
        shutil.copytree(self.model, copy)
        weights = copy / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
        return copy

    def dataset_copy(self, damage: Callable[[Path], None]) -> Path:
        copy = self.tmp / "damaged_dataset"
        shutil.copytree(self.dataset, copy)
        damage(copy)
        return copy

    def gzip_jsonl(self, name: str, damage: Callable[[bytes], bytes]) -> Path:
        data = gzip.compress(write_jsonl(self.tmp / "plain.jsonl", DOCS * 20).read_bytes(), mtime=0)
        return self.file(name, damage(data))

    def parquet(self, name: str, damage: Callable[[bytes], bytes]) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.tmp / name
        pq.write_table(pa.table({"text": DOCS * 20}), str(path))
        path.write_bytes(damage(path.read_bytes()))
        return path


def gen(f: Faults, *args: object) -> list[object]:
    """A generate command on the random model; later flags override these (argparse keeps the last)."""
    return ["generate", "--model-path", f.model, "--prompt", "De trein", "--precision", "fp32", "--max-new-tokens", "3",
            *args]


def ev(f: Faults, *args: object) -> list[object]:
    """An evaluate command of the random model on the test dataset (made with the same tokenizer)."""
    return ["evaluate", "--model-path", f.model, "--dataset-path", f.dataset, "--precision", "fp32", *args]


def ev_files(f: Faults, path: Path) -> list[object]:
    return ["evaluate", "--model-path", f.model, "--data-files", path, "--precision", "fp32"]


def _cut_arrow(dataset: Path) -> None:
    shard = next((dataset / "test").glob("data-*.arrow"))
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])


def _remove_tokenizer(dataset: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (dataset / name).unlink(missing_ok=True)


def _bad_block_type(data: bytes) -> bytes:
    """Damage a gzip stream's deflate data: its first block gets the reserved type 3 (zlib: invalid block type)."""
    return data[:10] + b"\xff" + data[11:]  # the header is 10 bytes (no name: gzip.compress writes none)


def _bad_crc(data: bytes) -> bytes:
    """Intact deflate data whose trailer CRC-32 does not match it."""
    return data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:]


OK = 0
ERR = 2


def case(id: str, build: Callable[[Faults], list[object]], rc: int, message: str, where: str = "err",
         stdin: bytes | None = None) -> object:
    return pytest.param(build, rc, message, where, stdin, id=id)


CASES = [
    # ---- generate: every numeric flag at 0, negative, huge, inf and nan
    case("generate-max-new-tokens-0", lambda f: gen(f, "--max-new-tokens", "0"), ERR,
         "--max-new-tokens must be positive (got 0)"),
    case("generate-max-new-tokens-negative", lambda f: gen(f, "--max-new-tokens", "-5"), ERR,
         "--max-new-tokens must be positive (got -5)"),
    case("generate-max-new-tokens-huge", lambda f: gen(f, "--max-new-tokens", HUGE), OK,
         f"new tokens, not {HUGE} (--max-new-tokens): the model's context is {CONTEXT} tokens"),
    case("generate-max-new-tokens-inf", lambda f: gen(f, "--max-new-tokens", "inf"), ERR,
         "argument --max-new-tokens: invalid int value: 'inf'"),
    case("generate-max-new-tokens-nan", lambda f: gen(f, "--max-new-tokens", "nan"), ERR,
         "argument --max-new-tokens: invalid int value: 'nan'"),
    case("generate-temperature-0", lambda f: gen(f, "--temperature", "0"), ERR,
         "--temperature must be positive (got 0.0); use --greedy"),
    case("generate-temperature-negative", lambda f: gen(f, "--temperature", "-1"), ERR,
         "--temperature must be positive (got -1.0)"),
    case("generate-temperature-huge", lambda f: gen(f, "--temperature", "1e300"), OK, ">>> De trein", "out"),
    case("generate-temperature-tiny", lambda f: gen(f, "--temperature", "1e-300"), ERR,
         "sampling failed: --temperature 1e-300 and --repetition-penalty 1.0 push the logits to infinity"),
    case("generate-temperature-inf", lambda f: gen(f, "--temperature", "inf"), ERR,
         "--temperature must be a finite number (got inf)"),
    case("generate-temperature-nan", lambda f: gen(f, "--temperature", "nan"), ERR,
         "--temperature must be a finite number (got nan)"),
    case("generate-top-k-0", lambda f: gen(f, "--top-k", "0"), OK, ">>> De trein", "out"),
    case("generate-top-k-negative", lambda f: gen(f, "--top-k", "-1"), ERR, "--top-k must be >= 0 (got -1)"),
    case("generate-top-k-huge", lambda f: gen(f, "--top-k", HUGE), OK, ">>> De trein", "out"),
    case("generate-top-k-inf", lambda f: gen(f, "--top-k", "inf"), ERR, "argument --top-k: invalid int value: 'inf'"),
    case("generate-top-k-nan", lambda f: gen(f, "--top-k", "nan"), ERR, "argument --top-k: invalid int value: 'nan'"),
    case("generate-top-p-0", lambda f: gen(f, "--top-p", "0"), ERR, "--top-p must be in (0, 1] (got 0.0)"),
    case("generate-top-p-negative", lambda f: gen(f, "--top-p", "-0.5"), ERR, "--top-p must be in (0, 1] (got -0.5)"),
    case("generate-top-p-huge", lambda f: gen(f, "--top-p", "1e300"), ERR, "--top-p must be in (0, 1] (got 1e+300)"),
    case("generate-top-p-inf", lambda f: gen(f, "--top-p", "inf"), ERR, "--top-p must be a finite number (got inf)"),
    case("generate-top-p-nan", lambda f: gen(f, "--top-p", "nan"), ERR, "--top-p must be a finite number (got nan)"),
    case("generate-repetition-penalty-0", lambda f: gen(f, "--repetition-penalty", "0"), ERR,
         "--repetition-penalty must be positive (got 0.0)"),
    case("generate-repetition-penalty-negative", lambda f: gen(f, "--repetition-penalty", "-2"), ERR,
         "--repetition-penalty must be positive (got -2.0)"),
    case("generate-repetition-penalty-huge", lambda f: gen(f, "--repetition-penalty", "1e300"), OK, ">>> De trein",
         "out"),
    case("generate-repetition-penalty-inf", lambda f: gen(f, "--repetition-penalty", "inf"), ERR,
         "--repetition-penalty must be a finite number (got inf)"),
    case("generate-repetition-penalty-nan", lambda f: gen(f, "--repetition-penalty", "nan"), ERR,
         "--repetition-penalty must be a finite number (got nan)"),
    case("generate-num-return-sequences-0", lambda f: gen(f, "--num-return-sequences", "0"), ERR,
         "--num-return-sequences must be between 1 and 1000 (got 0)"),
    case("generate-num-return-sequences-negative", lambda f: gen(f, "--num-return-sequences", "-3"), ERR,
         "--num-return-sequences must be between 1 and 1000 (got -3)"),
    case("generate-num-return-sequences-huge", lambda f: gen(f, "--num-return-sequences", HUGE), ERR,
         f"--num-return-sequences must be between 1 and 1000 (got {HUGE})"),
    case("generate-num-return-sequences-inf", lambda f: gen(f, "--num-return-sequences", "inf"), ERR,
         "argument --num-return-sequences: invalid int value: 'inf'"),
    case("generate-num-return-sequences-nan", lambda f: gen(f, "--num-return-sequences", "nan"), ERR,
         "argument --num-return-sequences: invalid int value: 'nan'"),
    case("generate-benchmark-batch-0", lambda f: gen(f, "--benchmark", "--benchmark-batch", "0"), ERR,
         "--benchmark-batch must be between 1 and 4096 (got 0)"),
    case("generate-benchmark-batch-negative", lambda f: gen(f, "--benchmark", "--benchmark-batch", "-16"), ERR,
         "--benchmark-batch must be between 1 and 4096 (got -16)"),
    case("generate-benchmark-batch-huge", lambda f: gen(f, "--benchmark", "--benchmark-batch", HUGE), ERR,
         f"--benchmark-batch must be between 1 and 4096 (got {HUGE})"),
    case("generate-benchmark-batch-inf", lambda f: gen(f, "--benchmark", "--benchmark-batch", "inf"), ERR,
         "argument --benchmark-batch: invalid int value: 'inf'"),
    case("generate-benchmark-batch-nan", lambda f: gen(f, "--benchmark", "--benchmark-batch", "nan"), ERR,
         "argument --benchmark-batch: invalid int value: 'nan'"),
    case("generate-seed-0", lambda f: gen(f, "--seed", "0"), OK, ">>> De trein", "out"),
    case("generate-seed-negative", lambda f: gen(f, "--seed", "-1"), ERR,
         "--seed must be between 0 and 4294967295 (got -1)"),
    case("generate-seed-huge", lambda f: gen(f, "--seed", str(2**40)), ERR,
         f"--seed must be between 0 and 4294967295 (got {2**40})"),
    case("generate-seed-inf", lambda f: gen(f, "--seed", "inf"), ERR, "argument --seed: invalid int value: 'inf'"),
    case("generate-seed-nan", lambda f: gen(f, "--seed", "nan"), ERR, "argument --seed: invalid int value: 'nan'"),
    # ---- generate: prompts longer than the context, prompt files, damaged weights
    case("generate-prompt-longer-than-context", lambda f: gen(f, "--prompt", LONG_PROMPT), OK,
         f"prompt 2 (140 tokens) is longer than the model's {CONTEXT}-token context: its first 109 tokens were "
         "dropped, its last 31 kept; it gets 1 new token, not 3 (--max-new-tokens)"),
    case("generate-prompt-file-not-utf8", lambda f: gen(f, "--prompt-file", f.file("p.txt", b"De trein\nHet \xff\n")),
         ERR, "p.txt is not UTF-8 text (line 2: byte 0xff)"),
    case("generate-prompt-file-missing", lambda f: gen(f, "--prompt-file", f.tmp / "nope.txt"), ERR,
         "nope.txt not found"),
    case("generate-prompt-file-directory", lambda f: gen(f, "--prompt-file", f.tmp), ERR,
         "is a directory; give a text file with one prompt per line"),
    case("generate-prompt-file-blank", lambda f: gen(f, "--prompt-file", f.file("blank.txt", b"\n  \n")), ERR,
         "blank.txt holds no prompts"),
    case("generate-model-safetensors-truncated-header", lambda f: gen(f, "--model-path", f.weights(lambda b: b[:100])),
         ERR, "cannot load the model in"),
    case("generate-model-safetensors-truncated-data",
         lambda f: gen(f, "--model-path", f.weights(lambda b: b[:len(b) // 2])), ERR, "cannot load the model in"),
    case("generate-model-safetensors-empty", lambda f: gen(f, "--model-path", f.weights(lambda b: b"")), ERR,
         "cannot load the model in"),
    case("generate-model-safetensors-garbage",
         lambda f: gen(f, "--model-path", f.weights(lambda b: b"\xff" * len(b))), ERR, "cannot load the model in"),
    # ---- the REPL: piped stdin
    case("generate-repl-line-not-utf8", lambda f: gen(f, "--interactive"), OK,
         "input line 1 is not valid UTF-8 (byte 0xff at position 3); skipped", stdin=b"De\xff\xfe\nHet\n"),
    case("generate-repl-temperature-nan", lambda f: gen(f, "--interactive"), OK,
         "/temp: --temperature must be a finite number (got nan)", "out", b"/temp nan\n"),
    case("generate-repl-seed-huge", lambda f: gen(f, "--interactive"), OK,
         f"/seed: --seed must be between 0 and 4294967295 (got {2**40})", "out", f"/seed {2**40}\n".encode()),
    case("generate-repl-max-huge", lambda f: gen(f, "--interactive"), OK,
         f"the prompt (2 tokens) gets 30 new tokens, not {HUGE} (--max-new-tokens)",
         stdin=f"/max {HUGE}\nHet\n".encode()),
    case("generate-repl-prompt-longer-than-context", lambda f: gen(f, "--interactive"), OK,
         "the prompt (140 tokens) is longer than the model's 32-token context: its first 109 tokens were dropped",
         stdin=LONG_PROMPT.encode() + b"\n"),
    case("generate-repl-sampling-overflow", lambda f: gen(f, "--interactive"), OK,
         "sampling failed: --temperature 1e-300", stdin=b"/temp 1e-300\nHet\n"),
    # ---- evaluate: numeric flags
    case("evaluate-batch-size-0", lambda f: ev(f, "--batch-size", "0"), ERR, "--batch-size must be positive (got 0)"),
    case("evaluate-batch-size-negative", lambda f: ev(f, "--batch-size", "-8"), ERR,
         "--batch-size must be positive (got -8)"),
    case("evaluate-batch-size-huge", lambda f: ev(f, "--batch-size", HUGE), OK, "tokens scored", "out"),
    case("evaluate-batch-size-inf", lambda f: ev(f, "--batch-size", "inf"), ERR,
         "argument --batch-size: invalid int value: 'inf'"),
    case("evaluate-batch-size-nan", lambda f: ev(f, "--batch-size", "nan"), ERR,
         "argument --batch-size: invalid int value: 'nan'"),
    case("evaluate-eval-chunks-0", lambda f: ev(f, "--eval-chunks", "0"), OK, "tokens scored", "out"),  # all
    case("evaluate-eval-chunks-negative", lambda f: ev(f, "--eval-chunks", "-1"), ERR,
         "--eval-chunks must be >= 0 (got -1)"),
    case("evaluate-eval-chunks-huge", lambda f: ev(f, "--eval-chunks", HUGE), OK, "tokens scored", "out"),
    case("evaluate-eval-chunks-inf", lambda f: ev(f, "--eval-chunks", "inf"), ERR,
         "argument --eval-chunks: invalid int value: 'inf'"),
    case("evaluate-eval-chunks-nan", lambda f: ev(f, "--eval-chunks", "nan"), ERR,
         "argument --eval-chunks: invalid int value: 'nan'"),
    # ---- evaluate: a dataset of another tokenizer, damaged datasets, data files and weights
    case("evaluate-tokenizer-mismatch", lambda f: ev(f, "--model-path", f.other), ERR,
         "was made with a different tokenizer than model"),
    case("evaluate-dataset-without-tokenizer", lambda f: ev(f, "--dataset-path", f.dataset_copy(_remove_tokenizer)),
         ERR, "holds no tokenizer (tokenizer.json, vocab.json, tokenizer_config.json), so it cannot be checked"),
    case("evaluate-dataset-truncated-arrow", lambda f: ev(f, "--dataset-path", f.dataset_copy(_cut_arrow)), ERR,
         "preprocess the data again"),
    case("evaluate-data-files-gzip-bad-header", lambda f: ev_files(f, f.file("bad.jsonl.gz", b"\x1f\x8bnot gzip")),
         ERR, "bad.jsonl.gz: corrupt gzip data"),
    case("evaluate-data-files-gzip-corrupt-deflate",
         lambda f: ev_files(f, f.gzip_jsonl("body.jsonl.gz", _bad_block_type)), ERR,
         "body.jsonl.gz: corrupt gzip data (Error -3 while decompressing data: invalid block type)"),
    case("evaluate-data-files-gzip-bad-crc", lambda f: ev_files(f, f.gzip_jsonl("crc.jsonl.gz", _bad_crc)), ERR,
         "crc.jsonl.gz: corrupt gzip data (CRC check failed"),
    case("evaluate-data-files-gzip-truncated",
         lambda f: ev_files(f, f.gzip_jsonl("cut.jsonl.gz", lambda b: b[:len(b) // 2])), ERR,
         "cut.jsonl.gz: cannot read it"),
    case("evaluate-data-files-jsonl-truncated",
         lambda f: ev_files(f, f.file("cut.jsonl", write_jsonl(f.tmp / "x.jsonl", DOCS).read_bytes()[:-20])), ERR,
         "cut.jsonl:12: not valid JSON"),
    case("evaluate-data-files-parquet-truncated",
         lambda f: ev_files(f, f.parquet("cut.parquet", lambda b: b[:len(b) // 2])), ERR,
         "cut.parquet: not a valid Parquet file"),
    case("evaluate-data-files-not-utf8", lambda f: ev_files(f, f.file("latin1.txt", "Één café\n".encode("latin-1"))),
         ERR, "latin1.txt:1: not UTF-8 text"),
    case("evaluate-model-safetensors-truncated", lambda f: ev(f, "--model-path", f.weights(lambda b: b[:100])), ERR,
         "cannot load the model in"),
]


def assert_handled(rc: int, text: str, err: str, message: str) -> None:
    """Exit 0, no error and no traceback, and the notice or reply on exactly one line."""
    assert rc == 0, err
    assert "Traceback" not in err and "error:" not in err, err
    assert sum(message in line for line in text.replace("\r", "\n").splitlines()) == 1, (message, text)


@pytest.mark.parametrize(("build", "rc", "message", "where", "stdin"), CASES)
def test_fault(build, rc, message, where, stdin, cli, tmp_path, tiny_model, other_model, tiny_dataset,
               monkeypatch) -> None:
    args = build(Faults(tmp_path, tiny_model, other_model, tiny_dataset))
    if stdin is not None:  # what a pipe gives the REPL: bytes, decoded by the reader
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code, out, err = cli(*args)
    if rc == ERR:
        assert_one_line_error(code, err, message)
    else:
        assert_handled(code, out if where == "out" else err, err, message)


def test_the_matrix_covers_every_numeric_flag_at_every_extreme() -> None:
    """A new numeric flag of GenerateConfig or EvaluateConfig must get its rows in the table."""
    import dataclasses

    from gpt2_dutch.evaluate import EvaluateConfig
    from gpt2_dutch.generate import GenerateConfig

    ids = {p.id for p in CASES}
    for command, cls in (("generate", GenerateConfig), ("evaluate", EvaluateConfig)):
        for field in dataclasses.fields(cls):
            if field.type in ("int", "float", "int | None", "float | None"):
                flag = field.name.replace("_", "-")
                for extreme in ("negative", "huge", "inf", "nan"):
                    assert f"{command}-{flag}-{extreme}" in ids, f"no case {command}-{flag}-{extreme}"
                assert f"{command}-{flag}-0" in ids
