"""Reading raw Dutch text, and writing/reading the processed chunk datasets that every stage after
`preprocess` consumes.

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
import hashlib
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError, is_disk_full

if TYPE_CHECKING:  # numpy and pyarrow are imported where they are used: the CLI's --help imports this module
    import numpy as np

HUB_DATASET = "BramVanroy/wikipedia_culturax_dutch"
# Config names count whitespace-separated words, not tokens.
HUB_CONFIGS = ["10k", "100k", "1M", "10M", "100M", "1B", "5B", "10B", "15B", "20B", "25B", "30B",
               "35B", "40B", "45B", "50B", "55B"]
STREAMING_FROM = "1B"  # configs from this size up are streamed: never held whole in memory or on disk
TEXT_EXTENSIONS = (".jsonl", ".json", ".parquet", ".txt")
MANIFEST = "manifest.json"
BATCH_DOCS = 1000  # documents per batch handed to the tokenizer: large enough to keep its threads busy
# JSON may escape half of a UTF-16 surrogate pair ("\ud800"): valid JSON, but no character, and no UTF-8 encoder
# or tokenizer accepts it. Each one is read as U+FFFD, the replacement character.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# ----------------------------------------------------------------------------------------------- raw text

def expand_data_files(patterns: list[str], flag: str = "data file") -> list[Path]:
    """Expand globs; every pattern must match at least one readable file with a known extension. `flag` names
    the patterns in the not-found error (bench: '--data-files')."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise UsageError(f"{flag} {pattern} not found (no file matches it)")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                raise UsageError(f"data file {path} is a directory; give the files in it, e.g. '{path}/*.jsonl'")
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
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        text = _text_of(record, path, f":{lineno}", text_column)
        if text and ("\\ud" in line or "\\uD" in line):  # a cheap test on the raw line first: it is rare
            text = _LONE_SURROGATE.sub("\ufffd", text)
        if text and text.strip():
            yield text


def _json_array_texts(path: Path, f: io.TextIOBase, text_column: str) -> Iterator[str]:
    try:
        records = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
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


# ------------------------------------------------------------------------------------- processed dataset

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), uint32 otherwise: at most 2 bytes/token normally."""
    import numpy as np

    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ChunkWriter:
    """Cuts a stream of token ids into fixed-size chunks and appends them to Arrow shards of one split.

    Shards use the exact layout of `Dataset.save_to_disk` (the same Arrow stream, schema metadata, state.json and
    dataset_info.json; tests/test_preprocess.py compares them with what `datasets` writes), written incrementally
    with pyarrow alone, so that memory holds at most one batch of tokens whatever the split's size and a
    preprocess run never pays for importing `datasets` (a fifth of a small run; docs/experiments/preprocess-speed.md).
    """

    SHARD_BYTES = 512 * 2**20
    BATCH_ROWS = 1000  # rows per Arrow record batch, as datasets' ArrowWriter writes them

    def __init__(self, split_dir: Path, split: str, chunk_size: int, dtype: np.dtype):
        self.split_dir, self.split, self.chunk_size, self.dtype = split_dir, split, chunk_size, dtype
        self.split_dir.mkdir(parents=True)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._writer: Any = None
        self._sink: Any = None
        self._schema: Any = None
        self._shard_bytes = 0
        self._shards: list[tuple[Path, int]] = []  # (path, rows)
        self._hash = hashlib.sha256()
        self.chunks = 0
        self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self._pending.append(ids.astype(self.dtype, copy=False))
        self._pending_len += len(ids)
        self.tokens += len(ids)
        if self._pending_len >= 64 * self.chunk_size:
            self._flush()

    def _flush(self) -> None:
        import numpy as np

        stream = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        n_full = len(stream) // self.chunk_size * self.chunk_size
        rest = stream[n_full:]
        self._pending, self._pending_len = ([rest], len(rest)) if len(rest) else ([], 0)
        if n_full:
            self._write(stream[:n_full])

    def _write(self, flat: np.ndarray) -> None:
        import numpy as np
        import pyarrow as pa

        if self._writer is None:
            path = self.split_dir / f"shard-{len(self._shards):05d}.arrow.tmp"
            self._sink = pa.OSFile(str(path), "wb")
            self._schema = arrow_schema(self.dtype, self.chunk_size)
            self._writer = pa.ipc.new_stream(self._sink, self._schema)
            self._shards.append((path, 0))
        # from_buffers, not pa.array(flat): pa.array first asks whether its argument is a pandas object, which
        # imports pandas (0.2 s) when it is installed; the ids are wrapped without a copy either way.
        flat = np.ascontiguousarray(flat)
        values = pa.Array.from_buffers(pa.from_numpy_dtype(flat.dtype), len(flat), [None, pa.py_buffer(flat)])
        column = pa.FixedSizeListArray.from_arrays(values, self.chunk_size)
        for start in range(0, len(column), self.BATCH_ROWS):  # what ArrowWriter does: readers get small batches
            batch = column.slice(start, self.BATCH_ROWS)
            self._writer.write_batch(pa.record_batch([batch], schema=self._schema))
        rows = len(flat) // self.chunk_size
        self._hash.update(flat.tobytes())
        self.chunks += rows
        path, shard_rows = self._shards[-1]
        self._shards[-1] = (path, shard_rows + rows)
        self._shard_bytes += flat.nbytes
        if self._shard_bytes >= self.SHARD_BYTES:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None
            self._shard_bytes = 0

    def finish(self) -> int:
        """Write what is left as full chunks; return the number of tokens dropped (the final partial chunk)."""
        if self._pending_len:
            self._flush()
        dropped = self._pending_len
        self._pending, self._pending_len = [], 0
        self._close_shard()
        n = len(self._shards)
        data_files = []
        for i, (tmp_path, _rows) in enumerate(self._shards):
            name = f"data-{i:05d}-of-{n:05d}.arrow"
            tmp_path.rename(self.split_dir / name)
            data_files.append({"filename": name})
        state = {
            "_data_files": data_files,
            "_fingerprint": self._hash.hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": self.split,
        }
        (self.split_dir / "state.json").write_text(json.dumps(state, indent=2))
        info = dataset_info(self.dtype, self.chunk_size)
        (self.split_dir / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        return dropped


def features_json(dtype: np.dtype, chunk_size: int) -> dict[str, Any]:
    """`Features({"input_ids": List(Value(dtype), length=chunk_size)})` as `datasets` serializes it."""
    return {"input_ids": {"feature": {"dtype": dtype.name, "_type": "Value"}, "length": chunk_size, "_type": "List"}}


def arrow_schema(dtype: np.dtype, chunk_size: int) -> Any:
    """The Arrow schema `datasets` writes for our chunks, with its features in the schema metadata."""
    import pyarrow as pa

    meta = json.dumps({"info": {"features": features_json(dtype, chunk_size)}})
    return pa.schema([pa.field("input_ids", pa.list_(pa.from_numpy_dtype(dtype), chunk_size))],
                     metadata={"huggingface": meta})


def dataset_info(dtype: np.dtype, chunk_size: int) -> dict[str, Any]:
    """`asdict(DatasetInfo(features=...))`, what `Dataset.save_to_disk` writes as dataset_info.json."""
    feature = features_json(dtype, chunk_size)["input_ids"]
    features = {"input_ids": {**feature, "feature": {**feature["feature"], "id": None}, "id": None}}
    return {"builder_name": None, "citation": "", "config_name": None, "dataset_name": None, "dataset_size": None,
            "description": "", "download_checksums": None, "download_size": None, "features": features,
            "homepage": "", "license": "", "post_processed": None, "post_processing_size": None,
            "size_in_bytes": None, "splits": None, "supervised_keys": None, "version": None}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a processed dataset directory, or a one-line error saying why there is none."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"dataset path {path} does not exist; create it with `gpt2-dutch preprocess`")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UsageError(
            f"{path} is not a processed dataset (no {MANIFEST}); create one with `gpt2-dutch preprocess`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{manifest_path} is corrupt ({e.msg}); preprocess the data again") from None
    for key in ("chunk_size", "vocab_size", "splits"):
        if key not in manifest:
            raise UsageError(f"{manifest_path} lacks '{key}'; preprocess the data again")
    return manifest


def load_split(path: str | Path, split: str) -> Any:
    """One split of a processed dataset as a `datasets.Dataset` with numpy formatting.

    A damaged split (a shard cut short by a full disk or an interrupted copy, overwritten, or missing) is a
    one-line error naming the file, never a pyarrow traceback; a shard that lost whole record batches still
    parses, so the number of chunks is also compared with the manifest's.
    """
    import pyarrow as pa
    from datasets import load_from_disk

    split_dir = Path(path) / split
    if not (split_dir / "state.json").is_file():
        raise UsageError(f"{path} has no '{split}' split; preprocess the data again")
    try:
        ds = load_from_disk(str(split_dir)).with_format("numpy")
    except (pa.ArrowException, OSError, ValueError) as e:  # ArrowInvalid and JSONDecodeError are ValueErrors
        raise _damaged_split(split_dir, e) from None
    expected = _manifest_chunks(Path(path), split)
    if expected is not None and len(ds) != expected:
        raise UsageError(f"{split_dir} holds {len(ds)} chunks where its {MANIFEST} says {expected}: a data-*.arrow "
                         "file was cut short or replaced; preprocess the data again")
    return ds


def _damaged_split(split_dir: Path, error: Exception) -> UsageError:
    """The one-line error for a split that does not load, naming its first unreadable shard."""
    import pyarrow as pa

    try:
        shards = [split_dir / f["filename"] for f in json.loads((split_dir / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return UsageError(f"{split_dir}/state.json is corrupt ({error}); preprocess the data again")
    for shard in shards:
        if not shard.is_file():
            return UsageError(f"{shard} is missing; preprocess the data again")
        try:
            with pa.memory_map(str(shard)) as source:  # what load_from_disk does, one shard at a time
                pa.ipc.open_stream(source).read_all()
        except (pa.ArrowException, OSError) as e:
            return UsageError(f"{shard} is truncated or corrupt ({_first_line(e)}); preprocess the data again")
    return UsageError(f"{split_dir} cannot be read ({_first_line(error)}); preprocess the data again")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


def _manifest_chunks(path: Path, split: str) -> int | None:
    """The split's chunk count according to the manifest, or None where there is no readable count."""
    try:
        chunks = json.loads((path / MANIFEST).read_text())["splits"][split]["chunks"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return chunks if isinstance(chunks, int) else None
