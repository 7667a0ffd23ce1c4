"""Reading raw Dutch text: local files and the Hugging Face dataset, always as batches of documents.

Raw text comes from the Hugging Face dataset `BramVanroy/wikipedia_culturax_dutch` or local files
(.jsonl/.json/.parquet/.txt, optionally .gz) and is always read as batches of documents, so memory stays
flat however large the corpus. A processed dataset is a directory that describes itself:

    manifest.json           what it holds: source, tokenizer, chunk size, per-split counts, dtype
    tokenizer.json, ...     the tokenizer (AutoTokenizer.from_pretrained(<dir>) works)
    dataset_dict.json       + train/ and test/: `datasets.load_from_disk(<dir>)` works
    train/data-*.arrow      one row per chunk: input_ids = fixed-size list of uint16 (uint32 if vocab > 65536)
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import re
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2_dutch.core.errors import UsageError, is_disk_full
from gpt2_dutch.core.reading import BeyondBounds, file_kind, loads

if TYPE_CHECKING:  # numpy and pyarrow are imported where they are used: the CLI's --help imports this module
    pass

HUB_DATASET = "BramVanroy/wikipedia_culturax_dutch"
# Config names count whitespace-separated words, not tokens.
HUB_CONFIGS = ["10k", "100k", "1M", "10M", "100M", "1B", "5B", "10B", "15B", "20B", "25B", "30B",
               "35B", "40B", "45B", "50B", "55B"]
STREAMING_FROM = "1B"  # configs from this size up are streamed: never held whole in memory or on disk
TEXT_EXTENSIONS = (".jsonl", ".json", ".parquet", ".txt")
BATCH_DOCS = 1000  # documents per batch handed to the tokenizer: large enough to keep its threads busy
# JSON may escape half of a UTF-16 surrogate pair ("\ud800"): valid JSON, but no character, and no UTF-8 encoder
# or tokenizer accepts it. Each one is read as U+FFFD, the replacement character.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# ----------------------------------------------------------------------------------------------- raw text

def expand_data_files(patterns: list[str], flag: str = "data file") -> list[Path]:
    """Expand globs; every pattern must match at least one readable file with a known extension. `flag` names
    the patterns in the not-found error (bench: '--data-files'). A pattern that names an existing path is that
    path, not a glob: a file called `a[1].jsonl` is read, not `a1.jsonl`."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        literal = os.path.lexists(expanded)
        matches = [expanded] if literal else sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise UsageError(f"{flag} {pattern} not found (no file matches it)")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                raise UsageError(f"data file {path} is a directory; give the files in it, e.g. '{path}/*.jsonl'")
            with contextlib.suppress(OSError):  # a missing or unreadable one is named below
                mode = path.stat().st_mode
                if not stat.S_ISREG(mode):  # a FIFO or a device would be read forever, or block
                    raise UsageError(f"data file {path} is {file_kind(mode)}, not a regular file; give regular "
                                     "files (.jsonl, .json, .parquet or .txt)")
            file_format(path)
            if not os.access(path, os.R_OK):
                raise UsageError(f"data file {path} is not readable (check its permissions)")
            files.append(path)
    return files


def file_format(path: Path) -> str:
    """'jsonl', 'json', 'parquet' or 'txt' from the file name (a trailing .gz is allowed)."""
    name = path.name.lower().removesuffix(".gz")
    for ext in TEXT_EXTENSIONS:
        if name.endswith(ext):
            return ext[1:]
    raise UsageError(
        f"{path}: unknown file type; use .jsonl, .json, .parquet or .txt (each optionally .gz)"
    )


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")  # type: ignore[return-value]
    return open(path, encoding="utf-8")  # noqa: SIM115 - closed by the caller's `with`


def iter_file_texts(path: Path, text_column: str = "text", sample_by: str = "paragraph") -> Iterator[str]:
    """Yield the documents of one local file (empty documents are skipped)."""
    fmt = file_format(path)
    with reading_errors(path, fmt):
        if fmt == "parquet":
            yield from _parquet_texts(path, text_column)
            return
        with _open_text(path) as f:
            if fmt == "txt":
                yield from _txt_texts(f, sample_by)
            elif fmt == "json" and _first_char(f) == "[":
                yield from _json_array_texts(path, f, text_column)
            else:
                yield from _jsonl_texts(path, f, text_column)


@contextlib.contextmanager
def reading_errors(path: Path, fmt: str) -> Iterator[None]:
    """Turn the ways reading `path` can fail (not UTF-8, damaged or truncated gzip, I/O) into one-line errors."""
    try:
        yield
    except UnicodeDecodeError:
        where = "" if fmt == "parquet" else _undecodable_line(path)
        raise UsageError(f"{path}{where}: not UTF-8 text; convert it with e.g. `iconv -t utf-8`") from None
    except (zlib.error, gzip.BadGzipFile) as e:  # damaged, not cut short: zlib.error is no OSError
        raise UsageError(f"{path}: corrupt gzip data ({e}); download or compress the file again") from None
    except EOFError as e:
        raise UsageError(f"{path}: cannot read it ({e}: the file is truncated); download or copy it again") from None
    except OSError as e:
        if is_disk_full(e):  # writing, not reading: the caller's disk_faults says so
            raise
        raise UsageError(f"{path}: cannot read it ({e})") from None


def iter_block_texts(path: Path, fmt: str, data: bytes, first_line: int, text_column: str,
                     sample_by: str) -> Iterator[str]:
    """The documents of `data`, a block of whole lines of `path` (.jsonl, or .txt by line or paragraph) that
    starts on line `first_line`: exactly what iter_file_texts yields for those lines, errors naming the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise UsageError(f"{path}:{line}: not UTF-8 text; convert it with e.g. `iconv -t utf-8`") from None
    if "\r" in text:  # what the file reader's universal newlines do
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    f = io.StringIO(text)
    if fmt == "txt":
        yield from _txt_texts(f, sample_by)
    else:
        yield from _jsonl_texts(path, f, text_column, first_line)


def _undecodable_line(path: Path) -> str:
    """':N' for the first line of `path` that is not UTF-8, or '' if none is found.

    Looked for only after the text reader failed (it decodes blocks of 8 KB, so where it stopped says little):
    the normal run pays nothing. Splitting at b"\\n" never cuts a UTF-8 character: no byte of a multi-byte
    character is a newline.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return f":{lineno}"
    except (OSError, EOFError, zlib.error):
        pass
    return ""


def _first_char(f: io.TextIOBase) -> str:
    while True:
        c = f.read(1)
        if not c or not c.isspace():
            f.seek(0)
            return c


def _text_of(record: Any, path: Path, where: str, text_column: str) -> str | None:
    if not isinstance(record, dict):
        raise UsageError(f"{path}{where}: expected a JSON object with a '{text_column}' field")
    if text_column not in record:
        fields = ", ".join(sorted(record)) or "none"
        raise UsageError(
            f"{path}{where}: no '{text_column}' field (it has: {fields}); choose one with --text-column"
        )
    value = record[text_column]
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{path}{where}: field '{text_column}' is {type(value).__name__}, not text")
    return value


def _jsonl_texts(path: Path, f: io.TextIOBase, text_column: str, first_line: int = 1) -> Iterator[str]:
    for lineno, line in enumerate(f, first_line):
        if not line.strip():
            continue
        try:
            record = loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        except BeyondBounds as e:
            raise UsageError(f"{path}:{lineno}: {e.problem}; is it a JSON Lines file of documents?") from None
        text = _text_of(record, path, f":{lineno}", text_column)
        if text and ("\\ud" in line or "\\uD" in line):  # a cheap test on the raw line first: it is rare
            text = _LONE_SURROGATE.sub("\ufffd", text)
        if text and text.strip():
            yield text


def _json_array_texts(path: Path, f: io.TextIOBase, text_column: str) -> Iterator[str]:
    try:
        records = loads(f.read())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except BeyondBounds as e:
        raise UsageError(f"{path}:{e.line}: {e.problem}; is it a JSON array of documents?") from None
    for i, record in enumerate(records):
        text = _text_of(record, path, f" (record {i})", text_column)
        if text:
            text = _LONE_SURROGATE.sub("\ufffd", text)
        if text and text.strip():
            yield text


def _txt_texts(f: io.TextIOBase, sample_by: str) -> Iterator[str]:
    if sample_by == "document":
        text = f.read()
        if text.strip():
            yield text.strip("\n")
        return
    if sample_by == "line":
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                yield line
        return
    paragraph: list[str] = []  # "paragraph": blocks separated by blank lines are documents
    for line in f:
        if line.strip():
            paragraph.append(line.rstrip("\n"))
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _parquet_texts(path: Path, text_column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source: Any = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path  # noqa: SIM115
    try:
        pf = pq.ParquetFile(source)
    except pa.ArrowInvalid as e:
        raise UsageError(f"{path}: not a valid Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_column not in names:
        raise UsageError(
            f"{path}: no '{text_column}' column (it has: {', '.join(names)}); choose one with --text-column"
        )
    kind = pf.schema_arrow.field(text_column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    # Some writers store text as plain binary (no UTF-8 annotation): decoded here, checked like any text.
    is_bytes = pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)
    if not (is_bytes or pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UsageError(f"{path}: column '{text_column}' holds {kind}, not text; choose one with --text-column")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[text_column], batch_size=BATCH_DOCS):
            for value in batch.column(0).to_pylist():
                row += 1
                try:
                    text = value.decode("utf-8") if is_bytes and value is not None else value
                except UnicodeDecodeError:
                    raise UsageError(f"{path} (row {row}): not UTF-8 text; convert it with e.g. `iconv -t utf-8`"
                                     ) from None
                if text and text.strip():
                    yield text
    except pa.ArrowInvalid as e:  # a damaged page or footer further in (an I/O error is an OSError: caught above)
        raise UsageError(f"{path}: not a valid Parquet file ({e})") from None


def iter_local_texts(files: list[Path], text_column: str, sample_by: str) -> Iterator[str]:
    for path in files:
        yield from iter_file_texts(path, text_column, sample_by)


def iter_hub_texts(name: str, config: str, split: str, text_column: str, streaming: bool) -> Iterator[str]:
    """Documents of one split of one config of a Hub dataset; failures become one-line errors."""
    ds = load_hub_split(name, config, split, streaming)
    if text_column not in (ds.column_names or [text_column]):
        raise UsageError(
            f"{name} has no '{text_column}' column (it has: {', '.join(ds.column_names)}); "
            "choose one with --text-column"
        )
    for batch in ds.iter(batch_size=BATCH_DOCS):
        for text in batch[text_column]:
            if text and text.strip():
                yield text


def load_hub_split(name: str, config: str, split: str, streaming: bool) -> Any:
    import datasets

    with _quiet_hub():
        try:
            return datasets.load_dataset(name, config, split=split, streaming=streaming)
        except Exception as e:  # noqa: BLE001 - offline, missing config, auth: all one actionable line
            raise _hub_error(name, config, e) from None


def hub_split_names(name: str, config: str) -> list[str]:
    """The split names of a Hub config (train and test for every config of the default dataset)."""
    import datasets

    with _quiet_hub():
        try:
            return list(datasets.get_dataset_split_names(name, config))
        except Exception as e:  # noqa: BLE001
            raise _hub_error(name, config, e) from None


def _hub_error(name: str, config: str, error: Exception) -> UsageError:
    cause = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return UsageError(
        f"cannot load {name} config '{config}' from the Hugging Face Hub ({cause}); "
        "offline, preprocess local text with --data-files FILE"
    )


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's per-retry warnings: the one-line error at the end says it all."""
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def batched(texts: Iterator[str], size: int = BATCH_DOCS) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
