"""The unit of preprocess's work: a *part* of the input, encoded by a worker process into one part file.

    gpt2-dutch preprocess --data-files 'corpus/*.jsonl.gz' --num-workers 32     # parts on 32 processes

The input is cut into parts in input order: a line-based file (.jsonl, .txt) into blocks of about --part-mb MB
of whole lines (whole paragraphs for .txt by paragraph), read by the main process, which only decompresses and
finds line ends; any other file (.json, .parquet, .txt by document) is one part that its worker reads itself;
a streamed Hub config is one part per data file (parquet shard), read by its worker with retries; a Hub config
held in memory is cut into blocks of documents. A worker parses its part, encodes every document, and writes the
ids (EOS after each document) with each document's token, word and byte counts to `KEY.npz`, under a temporary
name renamed into place once complete: a part file exists only when it is whole. Which documents go to test and
where chunks are cut is decided later, in input order, by preprocess_merge.py, so the output does not depend on
how many workers ran or how big the parts were.
"""

from __future__ import annotations

import gzip
import itertools
import os
import random
import signal
import socket
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gpt2_dutch.core.errors import UsageError, first_line, is_disk_full
from gpt2_dutch.core.ownership import die_with_parent
from gpt2_dutch.data.sources import BATCH_DOCS, batched, file_format, iter_block_texts, iter_file_texts, reading_errors
from gpt2_dutch.data.tokenizer import VERIFY_DOCS

T = TypeVar("T")
# Tests only: the worker encoding this part key SIGKILLs itself after its first batch of documents; with
# "KEY:run" it kills its whole process group (the run, as a scheduler's kill -9 of a job would) instead, with
# "KEY:main" the main process alone (as the OOM killer would), and goes on with its part.
KILL_HOOK = "GPT2_DUTCH_TEST_KILL_PART"


@dataclass
class Part:
    split: str  # "train" or "test": the source split it comes from
    key: str  # "f00003-b000012" (file 3, block 12): part files sort in input order
    kind: str  # "block": lines of a file, here as bytes; "file": a whole file; "texts": documents; "hub": a shard
    nbytes: int  # input bytes it covers (progress)
    path: str = ""
    fmt: str = ""
    first_line: int = 1
    data: bytes = b""
    texts: list[str] | None = None
    hub: tuple[str, str, str, int, int] | None = None  # dataset, config, split, shard index, number of shards
    # What the part was made from (a block's length and CRC-32, a file's size and time): a part file recorded for
    # other input is encoded again, so a file fixed after a bad line costs only the parts from that line on.
    check: str = ""


def part_key(file_index: int, block_index: int) -> str:
    return f"f{file_index:05d}-b{block_index:06d}"


def shard_of(n_files: int, file_index: int, block_index: int, num_shards: int) -> int:
    """Which of --num-shards machines encodes a part: whole files when there are enough of them (a machine then
    never reads the others' files), else blocks of the files in turn."""
    return file_index % num_shards if n_files >= num_shards else (file_index + block_index) % num_shards


# ---------------------------------------------------------------------------------------------------- planning

def file_parts(files: list[Path], split: str, text_column: str, sample_by: str, part_bytes: int,
               mine: Callable[[int, int], bool], file_is_mine: Callable[[int], bool]) -> Iterator[Part]:
    """The parts of local files, in input order; blocks of line-based files carry their bytes."""
    for fi, path in enumerate(files):
        if not file_is_mine(fi):
            continue
        fmt = file_format(path)
        if fmt == "jsonl" or (fmt == "txt" and sample_by != "document"):
            paragraphs = fmt == "txt" and sample_by == "paragraph"
            for bi, (first_line, data) in enumerate(read_blocks(path, fmt, paragraphs, part_bytes)):
                if mine(fi, bi):
                    yield Part(split, part_key(fi, bi), "block", len(data), str(path), fmt, first_line, data,
                               check=f"{first_line}:{len(data)}:{zlib.crc32(data):08x}")
        elif mine(fi, 0):
            st = path.stat()
            yield Part(split, part_key(fi, 0), "file", st.st_size, str(path), fmt,
                       check=f"{st.st_size}:{st.st_mtime_ns}")


def read_blocks(path: Path, fmt: str, paragraphs: bool, part_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(first line number, bytes) of consecutive blocks of about `part_bytes` of whole lines of `path`.

    A block ends at a line end (b"\\n" is never inside a UTF-8 character), for paragraphs at a blank line, so
    parsing the blocks one by one gives the documents of the whole file, and a line's number is its block's
    first line plus the line ends before it. Only C code touches the bytes: ~1 s per GB, gzip included.
    """
    opener: Any = gzip.open if path.name.lower().endswith(".gz") else open
    with reading_errors(path, fmt), opener(path, "rb") as f:
        line = 1
        while data := f.read(part_bytes):
            if not data.endswith(b"\n"):
                data += f.readline()
            if paragraphs:
                last = data[data.rfind(b"\n", 0, len(data) - 1) + 1:]
                while last.strip() and (more := f.readline()):
                    data += more
                    last = more
            yield line, data
            line += data.count(b"\n")


def text_block_parts(texts: Iterator[str], split: str, part_bytes: int,
                     mine: Callable[[int, int], bool]) -> Iterator[Part]:
    """Documents already read (a Hub config held in memory) in blocks of about `part_bytes`."""
    block: list[str] = []
    size = 0
    bi = 0
    for text in texts:
        block.append(text)
        size += len(text)  # characters: a cheap stand-in for bytes, only the block size depends on it
        if size >= part_bytes:
            if mine(0, bi):
                yield _texts_part(split, bi, block, size)
            block, size, bi = [], 0, bi + 1
    if block and mine(0, bi):
        yield _texts_part(split, bi, block, size)


def _texts_part(split: str, bi: int, texts: list[str], size: int) -> Part:
    crc = zlib.crc32("\0".join(texts).encode("utf-8", "surrogatepass"))
    return Part(split, part_key(0, bi), "texts", size, texts=texts, check=f"{len(texts)}:{crc:08x}")


# ------------------------------------------------------------------------------------------------- the worker

_WORKER: dict[str, Any] = {}


def init_worker(tokenizer_json: str, eos_id: int, dtype: str, engine: str, threads: int, text_column: str,
                sample_by: str, parts_dir: str, main_pid: int) -> None:
    """Runs once in each worker process: ties its life to the main process's (a killed run leaves no worker that
    would hold memory, or its dataset, forever), then builds its encoder (tiktoken's tables take ~0.1 s)."""
    die_with_parent(main_pid)
    if threads == 1:
        # A worker forked from a process whose Rust thread pool had started (a BPE trained, or TOKENIZERS_PARALLELISM
        # set, which stops tokenizers from disabling it after a fork) would wait forever on that pool's threads,
        # which a fork does not copy. One thread needs no pool.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    from gpt2_dutch.data.tokenizer import BatchEncoder

    _WORKER.update(encoder=BatchEncoder(Tokenizer.from_str(tokenizer_json), threads, engine), eos=eos_id,
                   dtype=dtype, text_column=text_column, sample_by=sample_by, parts_dir=Path(parts_dir),
                   main_pid=main_pid)


def encode_part(part: Part) -> dict[str, Any]:
    """Encode one part into its part file; return what the main process reports and records."""
    import numpy as np

    started = time.time()
    w = _WORKER
    encode = w["encoder"]
    encode.restart(verify_docs(part))
    dtype = np.dtype(w["dtype"])
    eos = (w["eos"],)
    tokens: list[np.ndarray] = []
    doc_tokens: list[int] = []
    doc_words: list[int] = []
    doc_bytes: list[int] = []
    kill = os.environ.get(KILL_HOOK, "").split(":")
    kill_at = kill[0] == part.key
    for batch in batched(part_texts(part, w["text_column"], w["sample_by"])):
        ids = encode(batch)
        lengths = [len(x) + 1 for x in ids]
        tokens.append(np.fromiter(itertools.chain.from_iterable(itertools.chain(x, eos) for x in ids),
                                  dtype=dtype, count=sum(lengths)))
        doc_tokens += lengths
        doc_words += [len(t.split()) for t in batch]
        doc_bytes += [len(t.encode("utf-8")) for t in batch]
        if kill_at:  # tests: die the hardest way, mid-part, as the OOM killer or a node failure would
            if kill[1:] == ["run"]:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            if kill[1:] == ["main"]:
                os.kill(w["main_pid"], signal.SIGKILL)
                kill_at = False
                time.sleep(1.0)  # time for die_with_parent to end this worker before it finishes the part
                continue
            os.kill(os.getpid(), signal.SIGKILL)
    arrays = {"tokens": np.concatenate(tokens) if tokens else np.zeros(0, dtype),
              "doc_tokens": np.asarray(doc_tokens, np.uint32), "doc_words": np.asarray(doc_words, np.uint32),
              "doc_bytes": np.asarray(doc_bytes, np.uint64), "encoder": np.asarray(encode.name),
              "check": np.asarray(part.check)}
    path = w["parts_dir"] / part.split / f"{part.key}.npz"
    write_part(path, arrays)
    return {"split": part.split, "key": part.key, "nbytes": part.nbytes, "documents": len(doc_tokens),
            "encoder": encode.name, "start": started, "end": time.time()}


def verify_docs(part: Part) -> int:
    """How many of a part's first documents are encoded both ways (tiktoken checked against tokenizers).

    The input's first part gets the 64 a single run always checked; every other part a number in proportion to
    its size (64 for a 32 MB part, at least 1), because the check runs at the speed of `tokenizers` on one
    thread, which on small parts was most of their time (docs/experiments/preprocess-speed.md).
    """
    if part.key == part_key(0, 0):
        return VERIFY_DOCS
    return max(1, min(VERIFY_DOCS, round(VERIFY_DOCS * part.nbytes / 32e6)))


def write_part(path: Path, arrays: dict[str, Any]) -> None:
    """np.savez under a temporary name (host and pid: shards may share the directory), renamed when whole."""
    import numpy as np

    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())  # a part that looks done must survive a power cut, not just a kill
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def part_texts(part: Part, text_column: str, sample_by: str) -> Iterator[str]:
    if part.kind == "block":
        return iter_block_texts(Path(part.path), part.fmt, part.data, part.first_line, text_column, sample_by)
    if part.kind == "file":
        return iter_file_texts(Path(part.path), text_column, sample_by)
    if part.kind == "texts":
        assert part.texts is not None
        return iter(part.texts)
    assert part.hub is not None
    return hub_shard_texts(*part.hub, text_column)


# ------------------------------------------------------------------------------------------ the Hub, with retries

def hub_shard_texts(name: str, config: str, split: str, index: int, n_shards: int, text_column: str,
                    sleep: Callable[[float], None] = time.sleep) -> Iterator[str]:
    """The documents of one data file of a streamed Hub split; a dropped connection reconnects and goes on.

    `datasets` already retries a failed read 20 times, 5 s apart (datasets.config.STREAMING_READ_MAX_RETRIES);
    what still escapes (resolving the files, opening a shard, a long outage) comes here: the stream is opened
    again after a backoff and the rows already encoded are skipped, not encoded again.
    """
    def open_at(skip: int) -> Iterator[str | None]:
        import datasets

        ds = datasets.load_dataset(name, config, split=split, streaming=True).shard(n_shards, index)
        if skip:
            ds = ds.skip(skip)
        for batch in ds.iter(batch_size=BATCH_DOCS):
            yield from batch[text_column]

    for text in retrying(open_at, f"{name} config '{config}' ({split}, data file {index + 1} of {n_shards})",
                         sleep=sleep):
        if text and text.strip():
            yield text


RETRIES = 8  # in a row without progress: 1+2+...+60 s of backoff, ~4 min, then the run stops (parts kept)
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 60.0


def retrying(open_at: Callable[[int], Iterator[T]], what: str, *, retries: int = RETRIES,
             first_delay: float = FIRST_DELAY_S, max_delay: float = MAX_DELAY_S,
             sleep: Callable[[float], None] = time.sleep) -> Iterator[T]:
    """The items of the stream `open_at(0)`; when it fails with a transient error it is opened again as
    `open_at(n)` (n = the items already yielded) after an exponential backoff with jitter. The count of
    failures resets whenever an item arrives; `retries` failures in a row end it with one line."""
    done = 0
    failures = 0
    while True:
        try:
            for item in open_at(done):
                yield item
                done += 1
                failures = 0
            return
        except Exception as e:  # noqa: BLE001 - classified right here; the rest is raised as it was
            if not is_transient(e):
                raise
            failures += 1
            if failures > retries:
                raise UsageError(f"reading {what} failed {retries + 1} times in a row ({first_line(e)}); the parts "
                                 "already done are kept: run the same command again to continue") from None
            delay = min(max_delay, first_delay * 2 ** (failures - 1)) * random.uniform(0.75, 1.0)
            print(f"note: reading {what} failed after {done} documents ({first_line(e)}); retry {failures} of "
                  f"{retries} in {delay:.0f} s", file=sys.stderr)
            sleep(delay)


_NETWORK_MODULES = {"requests", "urllib3", "httpx", "httpcore", "aiohttp", "fsspec", "huggingface_hub"}


def is_transient(error: BaseException) -> bool:
    """A network failure that may pass (connection, timeout, 5xx, 429), not a fault of the input or the disk."""
    if isinstance(error, UsageError):
        return False
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError):  # requests' errors are OSErrors; a missing file or a full disk is not a blip
        return not (is_disk_full(error) or isinstance(error, (FileNotFoundError, PermissionError,
                                                              IsADirectoryError)))
    return type(error).__module__.split(".")[0] in _NETWORK_MODULES
