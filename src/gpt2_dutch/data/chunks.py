"""The processed chunk dataset that every stage after `preprocess` consumes: writing it, and reading it back.

A processed dataset is a directory that describes itself:

    manifest.json           what it holds: source, tokenizer, chunk size, per-split counts, dtype
    tokenizer.json, ...     the tokenizer (AutoTokenizer.from_pretrained(<dir>) works)
    dataset_dict.json       + train/ and test/: `datasets.load_from_disk(<dir>)` works
    train/data-*.arrow      one row per chunk: input_ids = fixed-size list of uint16 (uint32 if vocab > 65536)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2_dutch.core.errors import UsageError, first_line
from gpt2_dutch.core.reading import Opt, open_regular, read_json, short

if TYPE_CHECKING:  # numpy and pyarrow are imported where they are used: the CLI's --help imports this module
    import numpy as np

MANIFEST = "manifest.json"

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), uint32 otherwise: at most 2 bytes/token normally."""
    import numpy as np

    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ChunkWriter:
    """Cuts a stream of token ids into fixed-size chunks and appends them to Arrow shards of one split.

    Shards use the exact layout of `Dataset.save_to_disk` (the same Arrow stream, schema metadata, state.json and
    dataset_info.json; tests/unit/data/test_chunks.py compares them with what `datasets` writes), written incrementally
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


_SPLIT = {"documents": Opt(int), "tokens": Opt(int), "bytes": Opt(int), "chunks": int}
# what the stages after preprocess read from a manifest; the rest (source, timings, ...) only describes it
MANIFEST_SCHEMA = {"format": Opt(str), "chunk_size": int, "vocab_size": int, "dtype": Opt(str),
                   "tokenizer": Opt({"eos_token_id": Opt(int)}), "splits": {"train": _SPLIT, "test": _SPLIT}}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a processed dataset directory, or a one-line error saying why there is none (or which of
    its fields is missing or of the wrong type)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"dataset path {path} does not exist; create it with `gpt2-dutch preprocess`")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():  # anything else there (a FIFO, a directory) is refused by read_json
        raise UsageError(
            f"{path} is not a processed dataset (no {MANIFEST}); create one with `gpt2-dutch preprocess`"
        )
    again = "preprocess the data again"
    manifest = read_json(manifest_path, schema=MANIFEST_SCHEMA, advice=again)
    for key in ("chunk_size", "vocab_size"):
        if manifest[key] <= 0:
            raise UsageError(f"{manifest_path}: {key} must be positive (got {manifest[key]}); {again}")
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
    _check_split_files(split_dir)
    try:
        ds = load_from_disk(str(split_dir)).with_format("numpy")
    except (pa.ArrowException, OSError, ValueError) as e:  # ArrowInvalid and JSONDecodeError are ValueErrors
        raise _damaged_split(split_dir, e) from None
    expected = _manifest_chunks(Path(path), split)
    if expected is not None and len(ds) != expected:
        raise UsageError(f"{split_dir} holds {len(ds)} chunks where its {MANIFEST} says {expected}: a data-*.arrow "
                         "file was cut short or replaced; preprocess the data again")
    return ds


_STATE_SCHEMA = {"_data_files": list}


def _check_split_files(split_dir: Path) -> None:
    """Read what `datasets.load_from_disk` would read unbounded (state.json, dataset_info.json) through core/reading,
    and check that every shard state.json names is a regular file in the split: a FIFO, a device, a huge or
    deeply nested file, or a name leading out of the directory is one line, not a hang or a traceback."""
    again = "preprocess the data again"
    state = read_json(split_dir / "state.json", schema=_STATE_SCHEMA, advice=again)
    for entry in state["_data_files"]:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise UsageError(f"{split_dir / 'state.json'} names {short(name if name is not None else entry)} as a "
                             f"shard, not a file of {split_dir}; {again}")
        shard = split_dir / name
        if not shard.exists() and not shard.is_symlink():
            raise UsageError(f"{shard} is missing; {again}")
        open_regular(shard, str(shard), again).close()
    info = split_dir / "dataset_info.json"
    if (info.exists() or info.is_symlink()) and not isinstance(read_json(info, advice=again), dict):
        raise UsageError(f"{info} must be a mapping; {again}")


def _damaged_split(split_dir: Path, error: Exception) -> UsageError:
    """The one-line error for a split that does not load, naming its first unreadable shard."""
    import pyarrow as pa

    try:
        # state.json is datasets' layout as ChunkWriter writes it (test_chunks.py compares it with datasets' own)
        shards = [split_dir / f["filename"] for f in read_json(split_dir / "state.json")["_data_files"]]
    except (UsageError, KeyError, TypeError):
        return UsageError(f"{split_dir}/state.json is corrupt ({error}); preprocess the data again")
    for shard in shards:
        if not shard.is_file():
            return UsageError(f"{shard} is missing; preprocess the data again")
        try:
            with pa.memory_map(str(shard)) as source:  # what load_from_disk does, one shard at a time
                pa.ipc.open_stream(source).read_all()
        except (pa.ArrowException, OSError) as e:
            return UsageError(f"{shard} is truncated or corrupt ({first_line(e)}); preprocess the data again")
    return UsageError(f"{split_dir} cannot be read ({first_line(error)}); preprocess the data again")


def _manifest_chunks(path: Path, split: str) -> int | None:
    """The split's chunk count according to the manifest, or None where there is no readable count."""
    try:
        chunks = read_json(path / MANIFEST)["splits"][split]["chunks"]
    except (UsageError, KeyError, TypeError):
        return None
    return chunks if isinstance(chunks, int) else None
