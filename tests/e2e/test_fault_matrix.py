"""The fault matrix: every bad input and fault a user can meet, one parametrized row (one id) per case.

Three tables, one per stage, each with the fixtures that stage needs:
- preprocess (and reading its output): every row runs the real command line and checks the exit status, the one
  line on stderr and the files: nothing the user had is deleted or changed (unless the row says what may go), and
  a failed run leaves nothing new behind, not even a temporary directory;
- train: finished runs are never changed by --resume, preemption saves and resumes bit-identically, diverged or
  empty runs are never published, every bad input is one line and changes nothing;
- generate and evaluate: one line on stderr, the right exit status, no traceback; handled extremes say what they
  did on exactly one line. The models are random 2-layer GPT-2s with a 32-token context.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import DOCS, NANO, assert_one_line_error, poison_training_step, write_jsonl
from safetensors.torch import load_file

from gpt2_dutch.runs.records import create_run_dir, run_status
from gpt2_dutch.train import TrainConfig, train

# ====================================================================================================
# preprocess
# ====================================================================================================


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
    may_leave: list[str] = field(default_factory=list)  # what a failed run may leave (finished work to continue from)


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
        from helpers import DOCS as docs

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
    mp.setattr("gpt2_dutch.data.chunks.ChunkWriter._write", write)


def disk_full_in_a_worker(mp: pytest.MonkeyPatch) -> None:
    """The disk fills while a worker writes its part file (the worker is forked: it inherits the patch)."""
    def savez(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
    mp.setattr("numpy.savez", savez)


def only_finished_parts_left(tmp: Path) -> None:
    """What a failed merge leaves: the work directory with whole part files, for the same command to continue."""
    work = tmp / "out" / ".x.work"
    assert sorted(p.name for p in (work / "parts" / "train").iterdir()) == ["f00000-b000000.npz"]
    assert not (tmp / "out" / "x").exists() and not list((tmp / "out").glob(".x.tmp-*"))


def one_shard_of_three_done(tmp: Path) -> None:
    from gpt2_dutch.preprocess import PreprocessConfig, preprocess

    preprocess(PreprocessConfig(data_files=[str(tmp / "corpus.jsonl")], tokenizer=str(tmp / "tok"), chunk_size=16,
                                output_dir=str(tmp / "out"), name="x", shard_index=0, num_shards=3))


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


PREPROCESS_CASES = [
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
    # a full disk: exit 1, the temporary directory is gone, the finished parts stay for the rerun
    pytest.param(Case(BASE, "no space left on the device while writing", rc=1, patch=disk_full,
                      may_leave=["out", "out/.x.work"], check=only_finished_parts_left), id="preprocess-disk-full"),
    pytest.param(Case(BASE, "no space left on the device while writing", rc=1, patch=disk_full_in_a_worker),
                 id="preprocess-disk-full-writing-a-part"),
    # sharding flags
    *[pytest.param(Case([*BASE, *flags], message), id=f"preprocess-shards-{label}") for flags, message, label in [
        (["--shard-index", "0"], "--shard-index needs --num-shards", "index-without-count"),
        (["--num-shards", "4"], "--num-shards needs --shard-index", "count-without-index"),
        (["--shard-index", "4", "--num-shards", "4"], "--shard-index must be between 0 and 3", "index-too-large"),
        (["--shard-index", "-1", "--num-shards", "4"], "--shard-index must be between 0 and 3", "index-negative"),
        (["--shard-index", "0", "--num-shards", "0"], "--num-shards must be between 1 and 100000", "count-zero"),
        (["--merge", "--shard-index", "0", "--num-shards", "2"], "give it without --shard-index", "merge-with-index"),
        (["--merge"], "nothing to merge", "merge-without-shards"),
    ]],
    pytest.param(Case([*NO_TOK, "--shard-index", "0", "--num-shards", "2"],
                      "shards must all encode with one tokenizer"), id="preprocess-shards-without-tokenizer"),
    pytest.param(Case([*BASE, "--merge", "--num-shards", "3"], "2 of 3 shards are not done (--shard-index 1, 2)",
                      setup=one_shard_of_three_done), id="preprocess-merge-before-every-shard-is-done"),
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
        ("--num-workers", "0", "zero", "--num-workers must be at least 1"),
        ("--num-workers", "-3", "negative", "--num-workers must be at least 1"),
        ("--num-workers", str(10**9), "huge", "--num-workers must be at most 1024"),
        ("--part-mb", "0", "zero", "--part-mb must be greater than 0"),
        ("--part-mb", "-1", "negative", "--part-mb must be greater than 0"),
        ("--part-mb", "1e9", "huge", "--part-mb must be at most 4096"),
        ("--part-mb", "nan", "nan", "--part-mb must be a finite number (got nan)"),
        ("--part-mb", "inf", "inf", "--part-mb must be a finite number (got inf)"),
        ("--num-shards", str(10**9), "huge", "--num-shards must be between 1 and 100000"),
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


@pytest.mark.parametrize("case", PREPROCESS_CASES)
def test_preprocess_fault(case: Case, tmp_path, cli, small_tokenizer, monkeypatch):
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
        left = sorted(p for p in set(after) - set(before)
                      if not any(p == k or p.startswith(k + "/") for k in case.may_leave))
        assert left == [] and set(before) <= set(after), "a failed run left something behind"
    if case.check:
        case.check(tmp_path)


# ====================================================================================================
# train
# ====================================================================================================


TINY = ["--model-size", "tiny", "--batch-size", "4", "--precision", "fp32"]


def tiny_cfg(dataset: Path, out: Path, **kw) -> TrainConfig:
    base = dict(dataset_path=str(dataset), model_size="tiny", batch_size=4, precision="fp32", output_dir=str(out))
    base.update(kw)
    return TrainConfig(**base)


def tree_digest(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: equal digests mean nothing was changed (bytes, not a hash of them:
    comparing them is as strict and far cheaper than hashing a run's checkpoints twice a row)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run of 4 steps with checkpoints at 2 and 4 (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("finished")
    return train(tiny_cfg(tiny_dataset, out, max_steps=4, save_every=2, eval_every=4))


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "runs"
    out.mkdir()
    copy = out / finished_run.name
    shutil.copytree(finished_run, copy, symlinks=True)
    (out / "gpt2-dutch-tiny-latest").symlink_to(copy.name)
    return copy


# ----------------------------------------------------------------------------- the table of one-line failures


def _corrupt_newest_checkpoint(run: Path) -> str:
    (run / "checkpoints" / "checkpoint-4" / "model.safetensors").write_bytes(b"\x00" * 100)
    return str(run / "checkpoints" / "checkpoint-4")


def _pickle_checkpoint(run: Path) -> str:
    ckpt = run / "checkpoints" / "checkpoint-4"
    state = load_file(ckpt / "model.safetensors")
    torch.save(state, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    return str(ckpt)


BAD = [
    # (id, extra arguments; "{run}" is a copy of a finished run, "{ckpt}" what the setup function returns, message)
    pytest.param(["--learning-rate", "inf"], None, "--learning-rate must be a finite number", id="lr-inf"),
    pytest.param(["--learning-rate", "nan"], None, "--learning-rate must be a finite number", id="lr-nan"),
    pytest.param(["--epochs", "inf"], None, "--epochs must be a finite number", id="epochs-inf"),
    pytest.param(["--epochs", "-1"], None, "--epochs must be positive", id="epochs-negative"),
    pytest.param(["--max-tokens", "inf"], None, "--max-tokens must be a finite number", id="max-tokens-inf"),
    pytest.param(["--max-tokens", "0"], None, "--max-tokens must be positive", id="max-tokens-zero"),
    pytest.param(["--warmup", "nan"], None, "--warmup must be a finite number", id="warmup-nan"),
    pytest.param(["--warmup", "-1"], None, "--warmup must be at least 0", id="warmup-negative"),
    pytest.param(["--weight-decay", "inf"], None, "--weight-decay must be a finite number", id="weight-decay-inf"),
    pytest.param(["--seed", "-1"], None, "--seed must be between 0 and 4294967295", id="seed-negative"),
    pytest.param(["--seed", str(2**40)], None, "--seed must be between 0 and 4294967295", id="seed-beyond-2**32"),
    pytest.param(["--batch-size", "0"], None, "--batch-size must be positive", id="batch-size-zero"),
    pytest.param(["--batch-size", str(10**9)], None, "fewer than one optimizer step needs",
                 id="batch-size-huge-zero-steps"),
    pytest.param(["--batch-size", "1000"], None, "fewer than one optimizer step needs",
                 id="batch-larger-than-split-with-max-steps"),
    pytest.param(["--gradient-accumulation-steps", str(10**12)], None, "fewer than one optimizer step needs",
                 id="accumulation-huge"),
    pytest.param(["--dataloader-workers", str(10**6)], None, "--dataloader-workers must be between 0 and 256",
                 id="dataloader-workers-huge"),
    pytest.param(["--max-steps", "0"], None, "--max-steps must be positive", id="max-steps-zero"),
    pytest.param(["--max-time", "inf"], None, "is not a positive duration", id="max-time-inf"),
    pytest.param(["--eval-chunks", "-1"], None, "--eval-chunks must be >= 0", id="eval-chunks-negative"),
    pytest.param(["--resume", "{run}"], None, "is finished (step 4) and is never changed by --resume alone",
                 id="resume-finished-run"),
    pytest.param(["--resume"], None, "is finished (step 4) and is never changed by --resume alone",
                 id="bare-resume-only-finished-runs"),
    pytest.param(["--resume", "{run}", "--max-steps", "3"], None, "--max-steps N with N > 4",
                 id="resume-finished-run-max-steps-not-beyond"),
    pytest.param(["--resume", "{ckpt}", "--max-steps", "8"], _corrupt_newest_checkpoint,
                 "model.safetensors is damaged", id="resume-explicit-corrupt-checkpoint"),
    pytest.param(["--resume", "{ckpt}", "--max-steps", "8"], _pickle_checkpoint,
                 "its weights are a pickle (pytorch_model.bin), which is never loaded", id="resume-pickle-checkpoint"),
    pytest.param(["--resume", "{run}", "--init-from", "{run}"], None, "not both", id="resume-and-init-from"),
    pytest.param(["--init-from", "{run}/checkpoints"], None, "not a model, run or checkpoint directory",
                 id="init-from-not-a-model"),
]


@pytest.mark.parametrize("args, setup, message", BAD)
def test_bad_input_is_one_line_and_changes_nothing(args, setup, message, tiny_dataset, run_copy, cli):
    ckpt = setup(run_copy) if setup else ""
    before = tree_digest(run_copy.parent)
    argv = [a.replace("{run}", str(run_copy)).replace("{ckpt}", ckpt) for a in args]
    if "--max-steps" not in argv:
        argv += ["--max-steps", "2"]
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", run_copy.parent, *argv)
    assert_one_line_error(rc, err, message)
    assert tree_digest(run_copy.parent) == before  # nothing written, nothing deleted, no new run directory


def test_an_argument_that_is_not_utf8_is_one_line(cli):
    bad = os.fsdecode(b"/tmp/data-\xff")  # how Python hands over undecodable bytes in argv
    rc, _, err = cli("train", "--dataset-path", bad)
    assert_one_line_error(rc, err, "is not valid UTF-8")


def test_init_from_a_model_of_another_shape_is_refused(tiny_dataset, run_copy, cli, tmp_path):
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, "--model-size", "small", "--batch-size", "4",
                     "--init-from", run_copy, "--output-dir", tmp_path / "o", "--max-steps", "1")
    assert_one_line_error(rc, err, "does not fit this run (n_layer 4 vs 12")


# ----------------------------------------------------------------------------- finished runs and extension


@pytest.mark.slow
def test_a_finished_run_grows_only_with_a_larger_max_steps_and_says_so(tiny_dataset, run_copy):
    old_final = (run_copy / "final_model" / "model.safetensors").read_bytes()
    run = train(tiny_cfg(tiny_dataset, run_copy.parent, resume=str(run_copy), max_steps=6, save_every=2))
    assert run == run_copy.resolve()
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["total_steps"] == 6 and saved["status"] == "finished"
    assert saved["extensions"] == [{"from_step": 4, "to_step": 6}]
    assert (run / "final_model" / "model.safetensors").read_bytes() != old_final
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # no repeated rows
    # the extension follows the schedule refitted to 6 steps (wsd: peak 2e-3, no warmup at 5% of 6, linear to 0
    # over the last 20% = 1.2 steps): scheduler.pt of the finished run must not bring the 4-step schedule back
    # (which would log 0 here). Step 5 itself runs at the learning rate the finished run ended with.
    lrs = {r["step"]: r["lr"] for r in rows}
    for step in (6,):
        expected = 2e-3 * (6 - (step - 1)) / (0.2 * 6)
        assert lrs[step] == pytest.approx(expected, rel=1e-6), (step, lrs)


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_the_weights(tiny_dataset, run_copy, tmp_path):
    # AdamW: --learning-rate sets its step (Muon's is its own 0.02)
    run = train(tiny_cfg(tiny_dataset, tmp_path / "o", init_from=str(run_copy), max_steps=1, learning_rate=1e-9,
                         warmup=0, optimizer="adamw"))
    start = load_file(run_copy / "final_model" / "model.safetensors")
    after = load_file(run / "final_model" / "model.safetensors")
    assert run != run_copy and json.loads((run / "run_config.json").read_text())["init_from"] == str(run_copy)
    # one step at lr 1e-9 moves the weights by ~1e-9: they are the source's, not random ones
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in start)


# ----------------------------------------------------------------------------- health checks


@pytest.mark.slow
def test_a_diverged_run_is_not_published_and_exits_nonzero(tiny_dataset, tmp_path, cli):
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path, "--max-steps", "12",
                     "--learning-rate", "1e6")
    assert_one_line_error(rc, err, "training diverged: 5 steps in a row had a non-finite loss or gradient")
    run = next(tmp_path.glob("gpt2-dutch-tiny-2*"))
    assert not (run / "final_model").exists() and not (tmp_path / "gpt2-dutch-tiny-latest").exists()
    assert run_status(run) == "diverged"
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))  # strict JSON
    for ckpt in (run / "checkpoints").glob("checkpoint-*"):  # no checkpoint holds NaN weights
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())


@pytest.mark.slow
def test_a_single_nonfinite_step_is_skipped_and_the_run_goes_on(tiny_dataset, tmp_path, monkeypatch, capsys):
    poison_training_step(monkeypatch, 3)  # the third training step's loss becomes NaN
    run = train(tiny_cfg(tiny_dataset, tmp_path, max_steps=6, log_every=1))
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row" in capsys.readouterr().err
    weights = load_file(run / "final_model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 0, 1, 1, 1, 1]
    assert all(r["loss"] is not None and r["loss"] < 6 for r in rows)


# ----------------------------------------------------------------------------- run names, disk full


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    now = datetime(2026, 1, 2, 3, 4, 5)
    a, b, c = (create_run_dir(tmp_path, "tiny", now) for _ in range(3))
    assert [p.name for p in (a, b, c)] == ["gpt2-dutch-tiny-20260102-030405", "gpt2-dutch-tiny-20260102-030405-2",
                                          "gpt2-dutch-tiny-20260102-030405-3"]


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_nothing_half_written(tiny_dataset, tmp_path, cli,
                                                                                    monkeypatch):
    import transformers.modeling_utils as modeling_utils

    real = modeling_utils.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "checkpoint-4" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path, "--max-steps", "6",
                     "--save-every", "2")
    assert_one_line_error(rc, err, "no space left on the device", code=1)
    run = next(tmp_path.glob("gpt2-dutch-tiny-2*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]  # no staging left
    assert not (run / "final_model").exists() and run_status(run) == "failed"


# ----------------------------------------------------------------------------- preemption


def _train_cmd(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpt2_dutch", "train", "--dataset-path", str(dataset), *NANO,
            "--output-dir", str(out), "--max-steps", "24", "--save-every", "100", "--eval-every", "12",
            "--log-every", "1", *extra]


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen) -> Path:
    deadline = time.time() + 120
    while time.time() < deadline:
        for metrics in out.glob("*/metrics.jsonl"):
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.endswith("}")]
            if steps and max(steps) >= step:
                return metrics.parent
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be stopped: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    pytest.fail("the run never reached the step")


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final weights of _train_cmd's run, never stopped: what every stopped and resumed run must end with."""
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_train_cmd(tiny_dataset, out), check=True, capture_output=True)
    return next(out.glob("gpt2-dutch-nano-2*")) / "final_model" / "model.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1], ids=["SIGUSR1"])
def test_a_signal_saves_a_checkpoint_and_a_bare_resume_ends_bit_identical(signum, tiny_dataset, tmp_path,
                                                                          uninterrupted):
    """Preemption: the signal is handled at the next step boundary (no --save-every checkpoint exists before
    it), `--resume` without a value finds the stopped run, and the final weights equal an uninterrupted run's.
    SIGUSR1 (Slurm's warning signal) here; SIGTERM, the same handler, in tests/e2e/test_multiprocess.py on two
    ranks, where its stop and bare resume end with every loss and weight equal too."""
    # an older finished run in the same output dir must not be what a bare --resume picks
    subprocess.run(_train_cmd(tiny_dataset, tmp_path / "b", "--max-steps", "2"), check=True, capture_output=True)
    proc = subprocess.Popen(_train_cmd(tiny_dataset, tmp_path / "b"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.1)  # names go down to the second; the older run above is then certainly older
    run_b = _wait_for_step(tmp_path / "b", 5, proc)
    os.kill(proc.pid, signum)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signum, err[-2000:]
    name = signal.Signals(signum).name
    last = err.strip().splitlines()[-1]
    assert f"stopped by {name} at step" in last and "--resume" in last and "Traceback" not in err
    stopped_at = int(last.split(" at step ")[1].split(";")[0])
    assert 5 <= stopped_at < 24
    assert [p.name for p in (run_b / "checkpoints").iterdir()] == [f"checkpoint-{stopped_at}"]
    assert not (run_b / "final_model").exists() and run_status(run_b) == "stopped"

    r = subprocess.run(_train_cmd(tiny_dataset, tmp_path / "b", "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming at step {stopped_at}" in r.stderr and str(run_b) in r.stderr
    a = load_file(uninterrupted)
    b = load_file(run_b / "final_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    rows = [json.loads(x) for x in (run_b / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 25))  # every step once: none lost, none repeated after the resume


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tiny_dataset, run_copy, tmp_path):
    run_config = json.loads((run_copy / "run_config.json").read_text())
    (run_copy / "run_config.json").write_text(json.dumps({**run_config, "status": "stopped"}))
    shutil.rmtree(run_copy / "final_model")
    ckpt = run_copy / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated by a kill
    r = subprocess.run([sys.executable, "-m", "gpt2_dutch", "train", "--dataset-path", str(tiny_dataset), *TINY,
                        "--output-dir", str(run_copy.parent), "--max-steps", "4", "--resume"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipping" in r.stderr and "checkpoint-4: optimizer.pt is damaged" in r.stderr
    assert "resuming at step 2" in r.stderr and (run_copy / "final_model" / "model.safetensors").is_file()


# ====================================================================================================
# generate and evaluate
# ====================================================================================================


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
    from gpt2_dutch.data.tokenizer import train_bpe

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


GENERATE_CASES = [
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


@pytest.mark.parametrize(("build", "rc", "message", "where", "stdin"), GENERATE_CASES)
def test_generate_fault(build, rc, message, where, stdin, cli, tmp_path, tiny_model, other_model, tiny_dataset,
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

    ids = {p.id for p in GENERATE_CASES}
    for command, cls in (("generate", GenerateConfig), ("evaluate", EvaluateConfig)):
        for config_field in dataclasses.fields(cls):
            if config_field.type in ("int", "float", "int | None", "float | None"):
                flag = config_field.name.replace("_", "-")
                for extreme in ("negative", "huge", "inf", "nan"):
                    assert f"{command}-{flag}-{extreme}" in ids, f"no case {command}-{flag}-{extreme}"
                assert f"{command}-{flag}-0" in ids


def test_a_max_time_run_stopped_before_its_fit_fits_after_resume(tmp_path, monkeypatch):
    """A --max-time run stopped during its first steps has no fitted length (run_config.json has no
    seconds_per_step): resumed, it measures from its first step after the resume and fits then, instead of
    keeping the 10**9-step upper bound forever. The clock is a fake one (0.1 s a step): no wall time decides."""
    from types import SimpleNamespace

    from gpt2_dutch.train import trainer as trainer_module
    from gpt2_dutch.train.schedule import make_schedule
    from gpt2_dutch.train.trainer import MaxTimeCallback

    clock = [0.0]
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock[0])

    (tmp_path / "run_config.json").write_text(json.dumps({"total_steps": 10**9}))
    schedule = make_schedule("cosine", 10**9, 5, 0.2)
    cb = MaxTimeCallback(60.0, schedule, 0.05, tmp_path, 10**9, auto_eval=True, auto_save=True)
    state = SimpleNamespace(global_step=7, max_steps=10**9, is_world_process_zero=True)
    args = SimpleNamespace(max_steps=10**9)
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    cb.on_train_begin(args, state, control)
    assert not cb.fitted
    for step in (8, 9, 10, 11):  # the first step after the resume is the reference, then 3 measured steps
        state.global_step = step
        clock[0] += 0.1
        cb.on_step_end(args, state, control)
    assert cb.fitted and 11 < state.max_steps < 10**9 and schedule.total_steps == state.max_steps
    saved = json.loads((tmp_path / "run_config.json").read_text())
    assert saved["total_steps"] == state.max_steps and saved["seconds_per_step"] >= 0
    cb.on_train_begin(args, state, control)  # resumed again after the fit: the fitted length stays
    assert cb.fitted


# ====================================================================================================
# the one line is the only line
# ====================================================================================================
# Every row is a bad input to one command, found where a library would print first (a load report, the Hub's
# retries, a progress bar, a warning): stderr must hold exactly one non-empty line, the error. The rows run in this
# process, so what a library prints is looked for on all three of its ways out: file descriptor 2 (capfd: native
# code, sys.stderr, tqdm), the handlers of the libraries' loggers (a recorder added to each: theirs write to the
# stream of their import time, which no capture here sees), and warnings. The Hub is a closed local port with no
# pause between retries: each retry's warning is still logged, in milliseconds.


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}"[:200])


def _unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.utils._http as hub_http
    from huggingface_hub import constants

    port = _closed_port()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_http.time, "sleep", lambda _s: None)  # the backoff between retries
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: connecting is refused at once


def _copy(src: Path, dst: Path, damage: Callable[[Path], None]) -> Path:
    shutil.copytree(src, dst)
    damage(dst)
    return dst


def _garbage_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").write_text("geen json\n")


def _config_only_tokenizer(d: Path) -> None:  # transformers would build an empty tokenizer from the config alone
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (d / name).unlink(missing_ok=True)


def _fifo_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").unlink()
    os.mkfifo(d / "tokenizer.json")


def _deep_tokenizer_config(d: Path) -> None:
    (d / "tokenizer_config.json").write_text('{"eos_token": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _fifo_dataset_info(d: Path) -> None:
    (d / "train" / "dataset_info.json").unlink()
    os.mkfifo(d / "train" / "dataset_info.json")


def _cut_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300])


@dataclass
class Only:
    build: Callable[[Path, Path, Path, Path], list[object]]  # (tmp, tokenizer, dataset, model) -> argv
    message: str
    rc: int = 2
    hub: bool = False  # the Hub is a closed port


def _tok_dir(tmp: Path, tok: Path, damage: Callable[[Path], None]) -> Path:
    return _copy(tok, tmp / "tok", damage)


def _pp(tmp: Path, tokenizer: object, *extra: object) -> list[object]:
    corpus = write_jsonl(tmp / "corpus.jsonl", DOCS * 8)
    return ["preprocess", "--data-files", corpus, "--tokenizer", tokenizer, "--output-dir", tmp / "out", "--name",
            "x", "--chunk-size", "16", *extra]


def _train(tmp: Path, dataset: object, *extra: object) -> list[object]:
    return ["train", "--dataset-path", dataset, "--model-size", "pico", "--max-steps", "1", "--output-dir",
            tmp / "runs", *extra]


def _bad_json_near_the_start(tmp: Path) -> Path:
    path = tmp / "bad.jsonl"
    path.write_text(json.dumps({"text": DOCS[0]}) + "\n" + '{"text": \n')
    return path


ONLY_LINE = [
    # preprocess: --tokenizer, the Hub, a data file refused while the tokenize bar would show
    pytest.param(Only(lambda t, k, d, m: _pp(t, _tok_dir(t, k, _garbage_tokenizer)), "tokenizer.json is not valid "
                      "JSON"), id="preprocess-tokenizer-garbage"),
    pytest.param(Only(lambda t, k, d, m: _pp(t, _tok_dir(t, k, _config_only_tokenizer)), "it holds no vocabulary"),
                 id="preprocess-tokenizer-config-only"),
    pytest.param(Only(lambda t, k, d, m: _pp(t, _tok_dir(t, k, _fifo_tokenizer)), "tokenizer.json is a FIFO"),
                 id="preprocess-tokenizer-fifo"),
    pytest.param(Only(lambda t, k, d, m: _pp(t, _tok_dir(t, k, _deep_tokenizer_config)), "tokenizer_config.json "
                      "line 1: lists or mappings nested deeper than 100"), id="preprocess-tokenizer-config-deep"),
    pytest.param(Only(lambda t, k, d, m: _pp(t, "no-such-org/no-such-tokenizer"), "from the Hugging Face Hub",
                      hub=True), id="preprocess-tokenizer-hub-unreachable"),
    pytest.param(Only(lambda t, k, d, m: ["preprocess", "--dataset-size", "10k", "--output-dir", t / "out"],
                      "from the Hugging Face Hub", hub=True), id="preprocess-hub-dataset-unreachable"),
    pytest.param(Only(lambda t, k, d, m: ["preprocess", "--data-files", _bad_json_near_the_start(t), "--tokenizer",
                                          k, "--output-dir", t / "out", "--num-workers", "2"], "bad.jsonl:2: not "
                      "valid JSON"), id="preprocess-bad-line-while-tokenizing"),
    # train: the dataset's tokenizer and files, the weights of --init-from
    pytest.param(Only(lambda t, k, d, m: _train(t, _copy(d, t / "ds", _garbage_tokenizer)), "its tokenizer cannot "
                      "be loaded (tokenizer.json is not valid JSON"), id="train-dataset-tokenizer-garbage"),
    pytest.param(Only(lambda t, k, d, m: _train(t, _copy(d, t / "ds", _config_only_tokenizer)), "it holds no "
                      "vocabulary"), id="train-dataset-without-vocabulary"),
    pytest.param(Only(lambda t, k, d, m: _train(t, _copy(d, t / "ds", _fifo_dataset_info)), "dataset_info.json is "
                      "a FIFO"), id="train-dataset-info-fifo"),
    pytest.param(Only(lambda t, k, d, m: _train(t, d, "--init-from", m), "does not fit this run"),
                 id="train-init-from-another-shape"),
    # generate: the model's tokenizer and weights, a bad input found after the model loaded
    pytest.param(Only(lambda t, k, d, m: ["generate", "--model-path", _copy(m, t / "m", _garbage_tokenizer),
                                          "--prompt", "De"], "its tokenizer does not load"),
                 id="generate-model-tokenizer-garbage"),
    pytest.param(Only(lambda t, k, d, m: ["generate", "--model-path", _copy(m, t / "m", _config_only_tokenizer),
                                          "--prompt", "De"], "it holds no vocabulary"),
                 id="generate-model-without-vocabulary"),
    pytest.param(Only(lambda t, k, d, m: ["generate", "--model-path", _copy(m, t / "m", _cut_weights), "--prompt",
                                          "De"], "cannot load the model in"), id="generate-cut-weights"),
    pytest.param(Only(lambda t, k, d, m: ["generate", "--model-path", m, "--prompt-file", t / "nope.txt"],
                      "nope.txt not found"), id="generate-prompt-file-missing-after-loading"),
    # evaluate: refused after the model loaded (its load bar), a data file refused while its bar would show
    pytest.param(Only(lambda t, k, d, m: ["evaluate", "--model-path", m, "--dataset-path",
                                          _copy(d, t / "ds", _garbage_tokenizer)], "has no readable tokenizer"),
                 id="evaluate-dataset-tokenizer-garbage-after-loading"),
    pytest.param(Only(lambda t, k, d, m: ["evaluate", "--model-path", m, "--data-files",
                                          _bad_json_near_the_start(t)], "bad.jsonl:2: not valid JSON"),
                 id="evaluate-bad-line-while-scoring"),
    # serve, push, bench
    pytest.param(Only(lambda t, k, d, m: ["serve", "--model-path", _copy(m, t / "m", _config_only_tokenizer)],
                      "it holds no vocabulary"), id="serve-model-without-vocabulary"),
    pytest.param(Only(lambda t, k, d, m: ["push", "--model-path", _copy(m, t / "m", _garbage_tokenizer),
                                          "--repo-id", "someone/m"], "its tokenizer is damaged", hub=True),
                 id="push-tokenizer-garbage"),
    pytest.param(Only(lambda t, k, d, m: ["push", "--model-path", _with_card(_copy(m, t / "m", lambda _d: None)),
                                          "--repo-id", "someone/m"], "cannot reach the Hub", rc=1, hub=True),
                 id="push-hub-unreachable"),
    pytest.param(Only(lambda t, k, d, m: ["bench", "preprocess", "--quick", "--tokenizer",
                                          _tok_dir(t, k, _garbage_tokenizer)], "tokenizer.json is not valid JSON"),
                 id="bench-tokenizer-garbage"),
    pytest.param(Only(lambda t, k, d, m: ["bench", "preprocess", "--quick", "--tokenizer", k, "--data-files",
                                          _bad_json_near_the_start(t)], "bad.jsonl:2: not valid JSON"),
                 id="bench-bad-line-in-data-file"),
]


def _with_card(model: Path) -> Path:
    (model / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    return model


@pytest.mark.parametrize("row", ONLY_LINE)
def test_the_error_line_is_the_only_line(row: Only, tmp_path, capfd, monkeypatch, small_tokenizer, tiny_dataset,
                                         tiny_model):
    from gpt2_dutch.__main__ import main
    from gpt2_dutch.core.errors import LIBRARY_LOGGERS

    if row.hub:
        _unreachable_hub(monkeypatch)
    args = [str(a) for a in row.build(tmp_path, small_tokenizer, tiny_dataset, tiny_model)]
    recorder = _Recorder()
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    for lg in loggers:
        lg.addHandler(recorder)
    capfd.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc = main(args)
    finally:
        for lg in loggers:
            lg.removeHandler(recorder)
    err = capfd.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert rc == row.rc, err
    assert len(lines) == 1 and ": error: " in lines[0] and row.message in lines[0], err
    assert recorder.lines == [], recorder.lines
    shown = [f"{w.category.__name__}: {w.message}" for w in caught
             if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)]
    assert shown == [], shown
