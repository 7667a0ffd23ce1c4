"""preprocess/parts.py at scale: any --num-workers and --part-mb give the same chunks, a bad line in a later part is
named and the rerun continues, the work directory, the Hub stream retries with backoff."""

from __future__ import annotations

import errno
import json
import random
import re

import pytest
from helpers import (
    CORPUS,
    DOCS,
    TINY_PART_MB,
    assert_one_line_error,
    assert_same_dataset,
    chunks,
    make_hub_like,
    run,
    write_jsonl,
)

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.data.sources import iter_file_texts
from gpt2_dutch.preprocess import PreprocessConfig, preprocess
from gpt2_dutch.preprocess.parts import is_transient, read_blocks, retrying

# ----------------------------------------------------------------------------------------- any number of workers


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "part_mb", "threads"), [
    (2, TINY_PART_MB, None), (3, 0.003, None), (1, TINY_PART_MB, None),
    (2, 0.003, 2),  # two encoder threads per worker: workers start from a fresh process (forkserver), not a fork
], ids=["2-workers-1KB-parts", "3-workers-3KB-parts", "1-worker-1KB-parts", "2-workers-2-threads-forkserver"])
def test_any_number_of_workers_and_part_size_gives_the_same_chunks(tmp_path, mixed_files, small_tokenizer, workers,
                                                                   part_mb, threads):
    one = run(tmp_path / "one", mixed_files, small_tokenizer, num_workers=1)  # one worker, one part per file
    many = run(tmp_path / "many", mixed_files, small_tokenizer, num_workers=workers, part_mb=part_mb,
               threads=threads)
    assert_same_dataset(one, many)
    manifest = json.loads((many / "manifest.json").read_text())
    assert manifest["parts"]["train"] > (12 if part_mb == TINY_PART_MB else 6), "the line-based files were cut up"
    assert json.loads((one / "manifest.json").read_text())["parts"]["train"] == 5
    # and the same as the documents encoded in one stream by the tokenizer itself, EOS after each
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_tokenizer))
    rng = random.Random(42)
    held = [rng.random() < 0.1 for _ in CORPUS]
    stream = [t for d, h in zip(CORPUS, held, strict=True) if not h
              for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    train = chunks(many)["train"]
    assert train.flatten().tolist() == stream[: train.size]


@pytest.mark.slow
def test_the_test_split_is_the_sources_own_across_parts(tmp_path, small_tokenizer):
    hub = make_hub_like(tmp_path / "hub", DOCS * 2)
    outs = [preprocess(PreprocessConfig(dataset_name=str(hub), dataset_size="10k", tokenizer=str(small_tokenizer),
                                        chunk_size=16, streaming=streaming, num_workers=2, part_mb=part_mb,
                                        output_dir=str(tmp_path / f"{streaming}-{part_mb}")))
            for streaming, part_mb in [(False, 32.0), (False, TINY_PART_MB), (True, 32.0)]]
    for other in outs[1:]:
        assert_same_dataset(outs[0], other)
    assert json.loads((outs[1] / "manifest.json").read_text())["source"]["test_split"] == "own"


def test_a_streamed_hub_config_is_one_part_per_data_file(tmp_path, small_tokenizer):
    """Three train files on a Hub-like dataset: three parts read by the workers, the same chunks as in memory."""
    root = tmp_path / "hub"
    (root / "10k").mkdir(parents=True)
    for i in range(3):
        write_jsonl(root / "10k" / f"train-{i}.jsonl", CORPUS[i * 80:(i + 1) * 80])
    (root / "README.md").write_text("---\nconfigs:\n- config_name: 10k\n  data_files:\n  - split: train\n"
                                    "    path: 10k/train-*.jsonl\n---\n")
    outs = [preprocess(PreprocessConfig(dataset_name=str(root), dataset_size="10k", tokenizer=str(small_tokenizer),
                                        chunk_size=16, streaming=streaming, num_workers=2,
                                        output_dir=str(tmp_path / str(streaming)))) for streaming in (False, True)]
    assert_same_dataset(*outs)
    assert json.loads((outs[1] / "manifest.json").read_text())["parts"]["train"] == 3


@pytest.mark.parametrize(("content", "paragraphs", "part_bytes"), [
    (b"".join(b'{"text": "%d"}\n' % i for i in range(50)), False, 7),
    (b"".join(b'{"text": "%d"}\n' % i for i in range(50)), False, 1000),
    (b'{"text": "a"}\n{"text": "b"}', False, 3),  # no newline at the end
    (b"een\ntwee\n\ndrie\n\n\nvier\nvijf\n\n   \nzes", True, 4),  # blank lines, one of spaces
    (b"een\r\ntwee\r\n\r\ndrie\r\n", True, 2),  # Windows line ends
    (b"", False, 5),
], ids=["jsonl-small-blocks", "jsonl-one-block", "no-final-newline", "paragraphs", "crlf-paragraphs", "empty"])
def test_blocks_are_whole_lines_or_paragraphs_and_give_the_files_documents(tmp_path, content, paragraphs,
                                                                         part_bytes):
    from gpt2_dutch.data.sources import iter_block_texts

    fmt = "txt" if paragraphs else "jsonl"
    path = tmp_path / f"f.{fmt}"
    path.write_bytes(content)
    blocks = list(read_blocks(path, fmt, paragraphs, part_bytes))
    assert b"".join(data for _, data in blocks) == content
    assert [line for line, _ in blocks] == [1 + sum(d.count(b"\n") for _, d in blocks[:i]) for i in range(len(blocks))]
    for _, data in blocks[:-1]:
        assert data.endswith(b"\n")
        if paragraphs:
            assert not data.splitlines()[-1].strip(), "a paragraph block ends after a blank line"
    sample_by = "paragraph" if paragraphs else "line"
    texts = [t for line, data in blocks for t in iter_block_texts(path, fmt, data, line, "text", sample_by)]
    assert texts == list(iter_file_texts(path, "text", sample_by))


# --------------------------------------------------------------------------------- failures keep finished parts


@pytest.mark.slow
def test_a_bad_line_in_a_later_part_names_the_line_keeps_finished_parts_and_the_rerun_continues(tmp_path, cli,
                                                                                              small_tokenizer):
    lines = [json.dumps({"text": t}) for t in CORPUS]
    lines[150] = '{"text": kapot}'
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    args = ["preprocess", "--data-files", tmp_path / "a.jsonl", "--tokenizer", small_tokenizer, "--output-dir",
            tmp_path / "out", "--name", "d", "--chunk-size", "16", "--part-mb", str(TINY_PART_MB), "--num-workers", "1"]
    rc, _, err = cli(*args)
    assert_one_line_error(rc, err, "a.jsonl:151: not valid JSON")
    work = tmp_path / "out" / ".d.work"
    kept = sorted(p.name for p in (work / "parts" / "train").glob("*.npz"))
    assert len(kept) >= 5 and not (tmp_path / "out" / "d").exists()
    lines[150] = json.dumps({"text": CORPUS[150]})
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    # the parts before the fixed line are kept (same bytes: same CRC-32); from that part on they are encoded
    rc, out, err = cli(*args)
    assert rc == 0, err
    reused = int(re.search(r"; (\d+) of \d+ parts done by an earlier run", out).group(1))
    # every part before the bad line; the fix changed that line's length, so the blocks after it are cut anew and a
    # part the worker finished after the bad one (it was already queued) no longer matches
    assert len(kept) - 1 <= reused <= len(kept) and reused >= 5
    assert_same_dataset(tmp_path / "out" / "d", run(tmp_path / "ref", [tmp_path / "a.jsonl"], small_tokenizer))
    assert not work.exists()


def test_a_run_started_with_other_settings_discards_the_old_work(tmp_path, mixed_files, small_tokenizer, capsys):
    out = tmp_path / "out"
    work = out / ".d.work"
    (work / "parts" / "train").mkdir(parents=True)
    (work / "plan.json").write_text(json.dumps({"format": "gpt2-dutch/preprocess-work", "part_mb": 1.0}))
    (work / "parts" / "train" / "f00000-b000000.npz").write_bytes(b"not from these settings")
    path = run(out, mixed_files, small_tokenizer)
    assert "discarding the unfinished work of an earlier preprocess with other settings" in capsys.readouterr().err
    assert_same_dataset(path, run(tmp_path / "ref", mixed_files, small_tokenizer))


@pytest.mark.slow
@pytest.mark.parametrize(("left", "adopted"), [
    ({"parts/train/": None, "lock-00000-of-00001": ""}, True),  # killed before it wrote plan.json
    ({"parts/train/.f00000-b000000.npz.tmp-host-1": "half"}, True),  # killed while writing a part
    ({"notes.txt": "mijn aantekeningen"}, False),  # not ours: refused, untouched
    ({"plan.json": "{}", "thesis.tex": "\\documentclass"}, False),
], ids=["before-plan", "half-written-part", "foreign-file", "foreign-beside-a-plan"])
def test_what_is_in_the_work_directorys_place(tmp_path, mixed_files, small_tokenizer, left, adopted):
    work = tmp_path / "out" / ".d.work"
    for name, content in left.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        if content is not None:
            (work / name).write_text(content)
    if adopted:
        assert_same_dataset(run(tmp_path / "out", mixed_files, small_tokenizer),
                            run(tmp_path / "ref", mixed_files, small_tokenizer))
        assert not work.exists()
    else:
        with pytest.raises(UsageError, match="is not a work directory of gpt2-dutch preprocess; move it away"):
            run(tmp_path / "out", mixed_files, small_tokenizer)
        assert sorted(p.name for p in work.iterdir()) == sorted(left)


# ----------------------------------------------------------------------------------------------------- shards


# ---------------------------------------------------------------------------------------- Hub: retry, backoff


class FlakyStream:
    """open_at(skip) -> items skip.. of range(n), failing with `error` once at each position in `fail_at`."""

    def __init__(self, n: int, fail_at: list[int], error: Exception):
        self.n, self.fail_at, self.error = n, list(fail_at), error
        self.opened: list[int] = []

    def __call__(self, skip: int):
        self.opened.append(skip)
        for i in range(skip, self.n):
            if self.fail_at and self.fail_at[0] == i:
                self.fail_at.pop(0)
                raise self.error
            yield i


def test_a_dropped_connection_reconnects_after_the_items_already_read():
    stream = FlakyStream(10, [0, 3, 3, 7], ConnectionError("Connection reset by peer"))
    sleeps: list[float] = []
    assert list(retrying(stream, "shard 1", sleep=sleeps.append, first_delay=1, max_delay=60)) == list(range(10))
    assert stream.opened == [0, 0, 3, 3, 7]  # every item once: reopened where it stopped
    # exponential backoff with jitter (75-100%), the count reset by progress: 1st, 1st, 2nd, 1st failure in a row
    assert len(sleeps) == 4
    assert all(0.75 * base <= s <= base for s, base in zip(sleeps, [1, 1, 2, 1], strict=True)), sleeps


def test_retries_stop_after_too_many_failures_in_a_row_with_one_line():
    stream = FlakyStream(10, [4] * 20, TimeoutError("read timed out"))
    sleeps: list[float] = []
    with pytest.raises(UsageError) as e:
        list(retrying(stream, "data file 2 of 9", retries=5, first_delay=1, max_delay=8, sleep=sleeps.append))
    assert "reading data file 2 of 9 failed 6 times in a row (read timed out)" in str(e.value)
    assert "run the same command again to continue" in str(e.value) and "\n" not in str(e.value)
    assert len(sleeps) == 5 and max(sleeps) <= 8 and sleeps[3] > sleeps[0]


def test_an_error_that_is_not_the_network_is_raised_at_once():
    stream = FlakyStream(10, [2], ValueError("bad row"))
    with pytest.raises(ValueError, match="bad row"):
        list(retrying(stream, "x", sleep=lambda s: pytest.fail("slept")))


class HTTPError(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.response = type("Response", (), {"status_code": status})()


TRANSIENT = [
    (ConnectionResetError("reset"), True), (TimeoutError("timeout"), True), (OSError("Network unreachable"), True),
    (HTTPError(503), True), (HTTPError(429), True), (HTTPError(404), False), (HTTPError(401), False),
    (OSError(errno.ENOSPC, "No space left on device"), False), (FileNotFoundError("gone"), False),
    (UsageError("bad input"), False), (ValueError("bad row"), False), (KeyError("text"), False),
]


@pytest.mark.parametrize(("error", "transient"), TRANSIENT, ids=[repr(e)[:40] for e, _ in TRANSIENT])
def test_which_errors_are_retried(error, transient):
    assert is_transient(error) is transient


# ------------------------------------------------------------------------------------------- layout, tokenizer
