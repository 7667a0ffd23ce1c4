"""Faults of preprocess and of reading its output: one table, one row per fault a user can meet.

Every row runs the real command line (`gpt2-dutch preprocess ...`, or `train` for a damaged dataset) and checks
the exit status, the one line on stderr, and the files: nothing the user had is deleted or changed (unless the
row says what may go), and a failed run leaves nothing new behind, not even a temporary directory.
"""

from __future__ import annotations

import errno
import gzip
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DOCS, assert_one_line_error, write_jsonl

CACHE = "hf_datasets_cache"  # conftest's per-test `datasets` cache: not the user's, not ours


@dataclass
class Case:
    args: list[str]  # placeholders: {tmp} the test's directory, {out} the output dir, {tok} a small tokenizer
    message: str  # on the last line of stderr (errors) or on one line of it (notices of a successful run)
    rc: int = 2
    setup: Callable[[Path], None] | None = None  # writes what the row needs beside corpus.jsonl
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    check: Callable[[Path], None] | None = None  # extra assertions on the files afterwards
    may_remove: list[str] = field(default_factory=list)  # the user's paths (relative) this row may delete
    command: str = "preprocess"


def dead_pid() -> int:
    """The id of a process that has exited (a killed preprocess, for these tests)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------- setups

def foreign_dir(tmp: Path) -> None:
    (tmp / "out" / "x").mkdir(parents=True)
    (tmp / "out" / "x" / "notes.txt").write_text("mijn aantekeningen\n")


def foreign_manifest_dir(tmp: Path) -> None:
    (tmp / "out" / "x").mkdir(parents=True)
    (tmp / "out" / "x" / "manifest.json").write_text(json.dumps({"format": "someone-else/v2", "items": 3}))


def corrupt_manifest_dir(tmp: Path) -> None:
    (tmp / "out" / "x").mkdir(parents=True)
    (tmp / "out" / "x" / "manifest.json").write_text('{"format": "gpt2-dutch/chu')


def regular_file(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "x").write_text("geen map\n")


def symlink_to_elsewhere(tmp: Path) -> None:
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_text(json.dumps({"format": "gpt2-dutch/chunks"}))
    (elsewhere / "thesis.tex").write_text("\\documentclass{article}\n")
    (tmp / "out").mkdir()
    (tmp / "out" / "x").symlink_to(elsewhere, target_is_directory=True)


def dangling_symlink(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "x").symlink_to(tmp / "nowhere")


def own_dataset(tmp: Path) -> None:
    (tmp / "out" / "x").mkdir(parents=True)
    (tmp / "out" / "x" / "manifest.json").write_text(json.dumps({"format": "gpt2-dutch/chunks", "chunk_size": 8}))
    (tmp / "out" / "x" / "train").mkdir()


def leftover_of_dead_run(tmp: Path) -> None:
    left = tmp / "out" / f".x.tmp-{dead_pid()}"
    (left / "train").mkdir(parents=True)
    (left / "train" / "shard-00000.arrow.tmp").write_bytes(b"\0" * 1000)
    (tmp / "out" / ".other.tmp-1").mkdir()  # another dataset's: not this run's business


def leftover_with_own_pid(tmp: Path) -> None:
    """In a container the next run often gets the killed run's process id: then the leftover has our name."""
    import os

    (tmp / "out" / f".x.tmp-{os.getpid()}" / "train").mkdir(parents=True)


def temp_of_live_run(tmp: Path) -> None:
    import os

    (tmp / "out" / f".x.tmp-{os.getppid()}" / "train").mkdir(parents=True)  # our parent: alive


def corrupt_gzip(name: str, payload: bytes) -> Callable[[Path], None]:
    """A complete gzip file whose deflate data is damaged in the middle (not cut short)."""
    def setup(tmp: Path) -> None:
        data = bytearray(gzip.compress(payload))
        for i in range(100, 200):
            data[i] ^= 0xFF
        (tmp / name).write_bytes(bytes(data))
    return setup


def parquet_bytes(texts: list[str]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), sink)
    return sink.getvalue().to_pybytes()


BIG_DOCS = [f"Document {i}: " + " ".join(DOCS) * 3 for i in range(300)]  # enough that the damage is mid-stream
JSONL_BYTES = "".join(json.dumps({"text": d}) + "\n" for d in BIG_DOCS).encode()
BAD_UTF8 = "Café in België".encode("latin-1")


def invalid_utf8(name: str) -> Callable[[Path], None]:
    good = [json.dumps({"text": d}, ensure_ascii=False).encode() for d in DOCS * 2]
    jsonl = b"\n".join([*good, b'{"text": "' + BAD_UTF8 + b'"}', *good]) + b"\n"  # the bad record on line 25
    contents = {
        "u.jsonl": jsonl,
        "u.jsonl.gz": gzip.compress(jsonl),
        "u.json": b"[" + b", ".join([*good, b'{"text": "' + BAD_UTF8 + b'"}']) + b"]",
        "u.txt": "\n\n".join(DOCS).encode() + b"\n\n" + BAD_UTF8 + b"\n",  # 12 paragraphs, then line 25
        "u.txt.gz": gzip.compress("\n\n".join(DOCS).encode() + b"\n\n" + BAD_UTF8 + b"\n"),
    }

    def setup(tmp: Path) -> None:
        if name == "binary.parquet":  # a binary column (old writers) holding Latin-1
            pq.write_table(pa.table({"text": pa.array([d.encode() for d in DOCS] + [BAD_UTF8])}), tmp / name)
        elif name == "string.parquet":  # a string column whose bytes are not UTF-8 (a careless writer)
            column = pa.array([d.encode() for d in DOCS] + [BAD_UTF8], pa.binary()).view(pa.string())
            pq.write_table(pa.table({"text": column}), tmp / name)
        else:
            (tmp / name).write_bytes(contents[name])
    return setup


def damaged_dataset(how: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        from conftest import DOCS as docs

        from gpt2_dutch.preprocess import PreprocessConfig, preprocess

        corpus = write_jsonl(tmp / "ds_corpus.jsonl", docs * 40)
        # chunk_size 8: the train split is several record batches (64 chunks each), so a cut between two of
        # them leaves a shard that parses cleanly but lacks rows
        path = preprocess(PreprocessConfig(data_files=[str(corpus)], tokenizer=str(tmp / "tok"), chunk_size=8,
                                           output_dir=str(tmp), name="ds"))
        shard = next((path / "train").glob("data-*.arrow"))
        data = shard.read_bytes()
        if how == "truncated":
            shard.write_bytes(data[: len(data) // 2 + 3])
        elif how == "garbage":
            shard.write_bytes(b"dit is geen arrow-bestand\n" * 40)
        elif how == "missing":
            shard.unlink()
        elif how == "short":  # whole record batches missing: valid Arrow, fewer chunks than the manifest says
            reader = pa.ipc.open_stream(pa.py_buffer(data))
            batches = list(reader)
            assert len(batches) > 1
            with pa.OSFile(str(shard), "wb") as f, pa.ipc.new_stream(f, reader.schema) as writer:
                writer.write_batch(batches[0])
    return setup


# ------------------------------------------------------------------------------------------------- checks

def manifest_of(tmp: Path) -> dict:
    return json.loads((tmp / "out" / "x" / "manifest.json").read_text())


def replaced_by_a_dataset(tmp: Path) -> None:
    m = manifest_of(tmp)
    assert m["format"] == "gpt2-dutch/chunks" and m["chunk_size"] == 16 and m["splits"]["train"]["chunks"] > 0
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["x"]


def real_vocab_size_recorded(tmp: Path) -> None:
    from transformers import AutoTokenizer

    m = manifest_of(tmp)
    real = len(AutoTokenizer.from_pretrained(str(tmp / "out" / "x")))
    assert 257 < real < 70_000
    assert m["vocab_size"] == real and m["tokenizer"]["vocab_size"] == real
    assert m["tokenizer"]["requested_vocab_size"] == 70_000
    assert "70000" not in m["tokenizer"]["origin"] and "70,000" not in m["tokenizer"]["origin"]
    assert str(real) in m["tokenizer"]["origin"]


def dead_leftover_removed(tmp: Path) -> None:
    names = sorted(p.name for p in (tmp / "out").iterdir())
    assert names == [".other.tmp-1", "x"], names


def live_temp_kept(tmp: Path) -> None:
    import os

    assert (tmp / "out" / f".x.tmp-{os.getppid()}" / "train").is_dir()


def seed_recorded(tmp: Path) -> None:
    assert manifest_of(tmp)["source"]["test_split"].endswith(f"(seed {2**32 - 1})")


def never_trained(mp: pytest.MonkeyPatch) -> None:
    """Fail loudly if the tokenizer is trained: the row's fault must be found before that expensive step."""
    def refuse(*_a, **_k):
        raise AssertionError("the tokenizer was trained although the split was known to be empty")
    mp.setattr("gpt2_dutch.preprocess.train_bpe", refuse)


def disk_full(mp: pytest.MonkeyPatch) -> None:
    def write(self, flat):
        raise OSError(errno.ENOSPC, "No space left on device")
    mp.setattr("gpt2_dutch.data.ChunkWriter._write", write)


def first_seed_with(held_out: bool) -> int:
    """A seed whose first draw puts a lone document in test (held_out) or in train, with --test-split 0.5."""
    return next(s for s in range(100) if (random.Random(s).random() < 0.5) == held_out)


BASE = ["--data-files", "{tmp}/corpus.jsonl", "--tokenizer", "{tok}", "--output-dir", "{out}", "--name", "x",
        "--chunk-size", "16"]
NO_TOK = ["--data-files", "{tmp}/corpus.jsonl", "--output-dir", "{out}", "--name", "x", "--chunk-size", "16"]


def on(file: str, *extra: str) -> list[str]:
    """BASE reading `file` instead of corpus.jsonl."""
    return ["--data-files", "{tmp}/" + file, *BASE[2:], *extra]


TRAIN_ON_DS = ["--dataset-path", "{tmp}/ds", "--model-size", "tiny", "--max-steps", "1", "--output-dir",
               "{tmp}/runs"]

CASES = [
    # --overwrite replaces only a dataset of ours
    pytest.param(Case([*BASE, "--overwrite"], "is not a dataset written by gpt2-dutch preprocess", setup=foreign_dir),
                 id="preprocess-overwrite-foreign-dir"),
    pytest.param(Case([*BASE, "--overwrite"], "is not a dataset written by gpt2-dutch preprocess",
                      setup=foreign_manifest_dir), id="preprocess-overwrite-foreign-manifest"),
    pytest.param(Case([*BASE, "--overwrite"], "is not a dataset written by gpt2-dutch preprocess",
                      setup=corrupt_manifest_dir), id="preprocess-overwrite-corrupt-manifest"),
    pytest.param(Case([*BASE, "--overwrite"], "is a file, not a dataset", setup=regular_file),
                 id="preprocess-overwrite-regular-file"),
    pytest.param(Case([*BASE, "--overwrite"], "is a symbolic link", setup=symlink_to_elsewhere),
                 id="preprocess-overwrite-symlink-elsewhere"),
    pytest.param(Case(BASE, "already exists; pass --overwrite", setup=dangling_symlink),
                 id="preprocess-no-overwrite-dangling-symlink"),
    pytest.param(Case(BASE, "already exists; pass --overwrite", setup=foreign_dir),
                 id="preprocess-no-overwrite-existing-dir"),
    pytest.param(Case([*BASE, "--overwrite"], "", rc=0, setup=own_dataset, check=replaced_by_a_dataset,
                      may_remove=["out/x/manifest.json", "out/x/train"]), id="preprocess-overwrite-own-dataset"),
    # leftovers of killed runs
    pytest.param(Case(BASE, "removed the unfinished output of an earlier preprocess that was killed", rc=0,
                      setup=leftover_of_dead_run, check=dead_leftover_removed, may_remove=["out/.x.tmp-"]),
                 id="preprocess-leftover-temp-of-dead-run"),
    pytest.param(Case(BASE, "removed the unfinished output of an earlier preprocess that was killed", rc=0,
                      setup=leftover_with_own_pid, may_remove=["out/.x.tmp-"]),
                 id="preprocess-leftover-temp-with-own-pid"),
    pytest.param(Case(BASE, "", rc=0, setup=temp_of_live_run, check=live_temp_kept),
                 id="preprocess-temp-of-live-run-kept"),
    # damaged compressed input: one line naming the file
    pytest.param(Case(on("c.jsonl.gz"), "c.jsonl.gz: corrupt gzip data", setup=corrupt_gzip("c.jsonl.gz", JSONL_BYTES)),
                 id="preprocess-corrupt-gzip-jsonl"),
    pytest.param(Case(on("c.json.gz"), "c.json.gz: corrupt gzip data",
                      setup=corrupt_gzip("c.json.gz", json.dumps([{"text": d} for d in BIG_DOCS]).encode())),
                 id="preprocess-corrupt-gzip-json"),
    pytest.param(Case(on("c.txt.gz"), "c.txt.gz: corrupt gzip data",
                      setup=corrupt_gzip("c.txt.gz", "\n\n".join(BIG_DOCS).encode())),
                 id="preprocess-corrupt-gzip-txt"),
    pytest.param(Case(on("c.parquet.gz"), "c.parquet.gz: corrupt gzip data",
                      setup=corrupt_gzip("c.parquet.gz", parquet_bytes(BIG_DOCS))),
                 id="preprocess-corrupt-gzip-parquet"),
    # bytes that are not UTF-8, in every format
    pytest.param(Case(on("u.jsonl"), "u.jsonl:25: not UTF-8 text", setup=invalid_utf8("u.jsonl")),
                 id="preprocess-invalid-utf8-jsonl"),
    pytest.param(Case(on("u.jsonl.gz"), "u.jsonl.gz:25: not UTF-8 text", setup=invalid_utf8("u.jsonl.gz")),
                 id="preprocess-invalid-utf8-jsonl-gz"),
    pytest.param(Case(on("u.json"), "u.json:1: not UTF-8 text", setup=invalid_utf8("u.json")),
                 id="preprocess-invalid-utf8-json"),
    pytest.param(Case(on("u.txt"), "u.txt:25: not UTF-8 text", setup=invalid_utf8("u.txt")),
                 id="preprocess-invalid-utf8-txt"),
    pytest.param(Case(on("u.txt.gz"), "u.txt.gz:25: not UTF-8 text", setup=invalid_utf8("u.txt.gz")),
                 id="preprocess-invalid-utf8-txt-gz"),
    pytest.param(Case(on("binary.parquet"), "binary.parquet (row 13): not UTF-8 text",
                      setup=invalid_utf8("binary.parquet")), id="preprocess-invalid-utf8-parquet-binary-column"),
    pytest.param(Case(on("string.parquet"), "string.parquet: not UTF-8 text", setup=invalid_utf8("string.parquet")),
                 id="preprocess-invalid-utf8-parquet-string-column"),
    # a damaged processed dataset, read by train (and evaluate: both read it with data.load_split)
    pytest.param(Case(TRAIN_ON_DS, "train/data-00000-of-00001.arrow is truncated or corrupt", command="train",
                      setup=damaged_dataset("truncated")), id="load-truncated-arrow-shard"),
    pytest.param(Case(TRAIN_ON_DS, "train/data-00000-of-00001.arrow is truncated or corrupt", command="train",
                      setup=damaged_dataset("garbage")), id="load-garbage-arrow-shard"),
    pytest.param(Case(TRAIN_ON_DS, "train/data-00000-of-00001.arrow is missing", command="train",
                      setup=damaged_dataset("missing")), id="load-missing-arrow-shard"),
    pytest.param(Case(TRAIN_ON_DS, "chunks where its manifest.json says", command="train",
                      setup=damaged_dataset("short")), id="load-arrow-shard-missing-batches"),
    # a full disk: exit 1, and the temporary directory is gone
    pytest.param(Case(BASE, "no space left on the device while writing", rc=1, patch=disk_full),
                 id="preprocess-disk-full"),
    # the BPE is smaller than asked: say so, record the real size
    pytest.param(Case([*NO_TOK, "--vocab-size", "70000"], "the training text supports only", rc=0,
                      check=real_vocab_size_recorded), id="preprocess-vocab-larger-than-text-supports"),
    # impossible splits are refused before the tokenizer is trained
    pytest.param(Case(["--data-files", "{tmp}/one.jsonl", *NO_TOK[2:], "--test-split", "0.5", "--seed",
                       str(first_seed_with(held_out=False))], "the test split would get none of the 1 documents",
                      setup=lambda t: write_jsonl(t / "one.jsonl", [" ".join(DOCS) * 20]), patch=never_trained),
                 id="preprocess-empty-test-split-before-training"),
    pytest.param(Case(["--data-files", "{tmp}/one.jsonl", *NO_TOK[2:], "--test-split", "0.5", "--seed",
                       str(first_seed_with(held_out=True))], "the train split would get none of the 1 documents",
                      setup=lambda t: write_jsonl(t / "one.jsonl", [" ".join(DOCS) * 20]), patch=never_trained),
                 id="preprocess-empty-train-split-before-training"),
    pytest.param(Case(["--data-files", "{tmp}/one.jsonl", *NO_TOK[2:]], "the test split would get none of the 1",
                      setup=lambda t: write_jsonl(t / "one.jsonl", DOCS[:1]), patch=never_trained),
                 id="preprocess-default-carve-empty-test-before-training"),
    # numeric flags at their extremes
    *[pytest.param(Case([*BASE, flag, value], message), id=f"preprocess-{flag[2:]}-{label}") for flag, value, label,
      message in [
        ("--chunk-size", "0", "zero", "--chunk-size must be at least 2"),
        ("--chunk-size", "-16", "negative", "--chunk-size must be at least 2"),
        ("--chunk-size", str(2**40), "huge", "--chunk-size 1099511627776 is absurdly large"),
        ("--chunk-size", "inf", "inf", "argument --chunk-size: invalid int value: 'inf'"),
        ("--vocab-size", "0", "zero", "--vocab-size 0 is too small"),
        ("--vocab-size", "-1", "negative", "--vocab-size -1 is too small"),
        ("--vocab-size", str(2**40), "huge", "--vocab-size 1099511627776 is too large"),
        ("--tokenizer-train-mb", "inf", "inf", "--tokenizer-train-mb must be a finite number (got inf)"),
        ("--tokenizer-train-mb", "nan", "nan", "--tokenizer-train-mb must be a finite number (got nan)"),
        ("--tokenizer-train-mb", "0", "zero", "--tokenizer-train-mb must be greater than 0"),
        ("--tokenizer-train-mb", "-5", "negative", "--tokenizer-train-mb must be greater than 0"),
        ("--test-split", "nan", "nan", "--test-split must be a finite number (got nan)"),
        ("--test-split", "inf", "inf", "--test-split must be a finite number (got inf)"),
        ("--test-split", "-0.1", "negative", "--test-split must be in (0, 0.5]"),
        ("--test-split", "1e300", "huge", "--test-split must be in (0, 0.5]"),
        ("--threads", "0", "zero", "--threads must be at least 1"),
        ("--threads", "-2", "negative", "--threads must be at least 1"),
        ("--threads", str(10**9), "huge", "--threads must be at most 1024"),
        ("--seed", "-1", "negative", "--seed must be between 0 and 4294967295 (got -1)"),
        ("--seed", str(2**40), "huge", "--seed must be between 0 and 4294967295 (got 1099511627776)"),
    ]],
    pytest.param(Case([*BASE, "--seed", str(2**32 - 1), "--test-split", "0.3"], "", rc=0, check=seed_recorded),
                 id="preprocess-seed-largest-accepted"),
]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (symlinks as links, directories as None) with its content."""
    files: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel.split("/")[0] == CACHE:
            continue
        if p.is_symlink():
            files[rel] = b"-> " + str(p.readlink()).encode()
        elif p.is_file():
            files[rel] = p.read_bytes()
        else:
            files[rel] = None
    return files


@pytest.mark.parametrize("case", CASES)
def test_fault(case: Case, tmp_path, cli, small_tokenizer, monkeypatch):
    shutil.copytree(small_tokenizer, tmp_path / "tok")
    write_jsonl(tmp_path / "corpus.jsonl", DOCS * 8)
    if case.setup:
        case.setup(tmp_path)
    before = snapshot(tmp_path)
    if case.patch:
        case.patch(monkeypatch)
    args = [a.format(tmp=tmp_path, out=tmp_path / "out", tok=tmp_path / "tok") for a in case.args]

    rc, _, err = cli(case.command, *args)

    if case.rc == 0:
        assert rc == 0 and "Traceback" not in err, err
        if case.message:
            assert any(case.message in line for line in err.replace("\r", "\n").splitlines()), err
    else:
        assert rc == case.rc, err
        assert_one_line_error(2, err, case.message)  # conftest's checks of the line itself (it assumes exit 2)
    after = snapshot(tmp_path)
    for path, content in before.items():
        if any(path.startswith(prefix) for prefix in case.may_remove):
            continue
        assert after.get(path, "gone") == content, f"{path} was deleted or changed"
    if case.rc != 0:
        assert sorted(after) == sorted(before), "a failed run left something behind"
    if case.check:
        case.check(tmp_path)
