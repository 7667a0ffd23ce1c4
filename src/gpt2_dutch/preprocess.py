"""Preprocess Dutch text into training-ready token chunks (run once; training never tokenizes).

    gpt2-dutch preprocess --dataset-size 10k                        # Hub config -> processed_data/chunked_10k
    gpt2-dutch preprocess --data-files 'corpus/*.jsonl.gz'          # local text, works offline
    gpt2-dutch preprocess --dataset-size 10B --tokenizer processed_data/chunked_1B   # streamed, shared BPE

Steps: read documents -> train (or load) a byte-level BPE on the training split -> tokenize in batches
(tiktoken's Rust encoder for GPT-2-style BPEs, checked to give the same ids as `tokenizers`) -> append
<|endoftext|> after every document -> cut the stream into --chunk-size blocks (no padding, final partial
block dropped) -> write Arrow shards into a temporary directory -> rename it into place with its manifest and
tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .config import option
from .data import (
    HUB_CONFIGS,
    HUB_DATASET,
    MANIFEST,
    STREAMING_FROM,
    ChunkWriter,
    batched,
    expand_data_files,
    iter_hub_texts,
    iter_local_texts,
    token_dtype,
)
from .errors import UsageError, check, check_number, check_seed, disk_faults
from .files import pid_alive, replace_dir, temp_name
from .tokenizer import (
    DEFAULT_VOCAB_SIZE,
    ENCODERS,
    MIN_VOCAB_SIZE,
    BatchEncoder,
    load_tokenizer,
    split_long_text,
    train_bpe,
)

MAX_CHUNK_SIZE = 1 << 20
MAX_THREADS = 1024
DATASET_FORMAT = "gpt2-dutch/chunks"  # the manifest's "format": what --overwrite may replace
# Fraction of training documents held out when a source has no (big enough) test split of its own.
DEFAULT_CARVE_FRACTION = 0.1


@dataclass
class PreprocessConfig:
    dataset_size: str | None = option(
        None, f"config of {HUB_DATASET} to download: {', '.join(HUB_CONFIGS)} (whitespace words); "
        "'builtin' for the sample shipped with the package. Default 10k unless --data-files is given")
    data_files: list[str] = option(
        [], "local text instead of the Hub: .jsonl/.json/.parquet/.txt, optionally .gz; globs allowed; "
        "repeatable")
    dataset_name: str = option(HUB_DATASET, "Hugging Face dataset (or local dataset directory) whose "
                               "--dataset-size config is read")
    text_column: str = option("text", "field/column holding the text in .jsonl/.json/.parquet files")
    sample_by: str = option("paragraph", "what a document is in .txt files: a blank-line separated "
                            "paragraph, a line, or the whole file", choices=["paragraph", "line", "document"])
    tokenizer: str | None = option(
        None, "use an existing tokenizer instead of training a Dutch BPE: 'gpt2' or another Hub name, a "
        "saved tokenizer dir, a processed dataset dir, or a dir with vocab.json + merges.txt")
    vocab_size: int = option(DEFAULT_VOCAB_SIZE, "vocabulary size of the Dutch BPE that is trained")
    tokenizer_train_mb: float = option(
        500.0, "train the BPE on at most this many MB of training text (a bounded sample for big configs)")
    chunk_size: int = option(1024, "tokens per training chunk (the model's context length)")
    test_split: float | None = option(
        None, "carve this fraction of the training documents out as the test split instead of using the "
        "dataset's own test split (0 < f <= 0.5)")
    streaming: bool | None = option(
        None, f"process the data as it arrives, never holding it whole in memory or on disk (automatic "
        f"from {STREAMING_FROM} up)", action=argparse.BooleanOptionalAction)
    threads: int | None = option(None, "tokenizer threads (default: all cores)", aliases=["--num-proc"])
    encoder: str = option(
        "auto", "auto: tiktoken's encoder (3x faster, same ids) when the tokenizer is a GPT-2-style byte-level "
        "BPE, checked on the first documents; tokenizers: always the tokenizer's own encoder", choices=ENCODERS)
    output_dir: str = option("processed_data", "where datasets are written")
    name: str | None = option(None, "dataset directory name (default chunked_<size> or chunked_<file stem>)")
    overwrite: bool = option(False, "replace an existing dataset of the same name")
    seed: int = option(42, "seed for carving a test split")

    def __post_init__(self) -> None:
        if self.dataset_size is None and not self.data_files:
            self.dataset_size = "10k"
        check(not (self.dataset_size and self.data_files), "give either --dataset-size or --data-files, not both")
        if self.dataset_size and self.dataset_size != "builtin" and self.dataset_name == HUB_DATASET:
            sizes = {s.lower(): s for s in HUB_CONFIGS}
            check(self.dataset_size.lower() in sizes, f"unknown --dataset-size '{self.dataset_size}'; valid "
                  f"sizes: {', '.join(HUB_CONFIGS)}, builtin")
            self.dataset_size = sizes[self.dataset_size.lower()]
        # Integer flags: argparse already refuses inf/nan for them; the messages name the value as given.
        check(self.chunk_size >= 2, f"--chunk-size must be at least 2 (got {self.chunk_size})")
        check(self.chunk_size <= MAX_CHUNK_SIZE, f"--chunk-size {self.chunk_size} is absurdly large; GPT-2 "
              f"uses 1024 (at most {MAX_CHUNK_SIZE})")
        # Checked with --tokenizer too (where it is unused): a nonsense value is a mistake either way.
        check(self.vocab_size >= MIN_VOCAB_SIZE, f"--vocab-size {self.vocab_size} is too small: a "
              f"byte-level BPE needs at least {MIN_VOCAB_SIZE} (256 bytes + <|endoftext|>)")
        check(self.vocab_size <= 2**32, f"--vocab-size {self.vocab_size} is too large (uint32 ids: at most 2**32)")
        check_number(self.test_split, "--test-split")
        if self.test_split is not None:
            check(0 < self.test_split <= 0.5, f"--test-split must be in (0, 0.5], got {self.test_split}")
        check(self.threads is None or self.threads >= 1, f"--threads must be at least 1 (got {self.threads})")
        # RAYON_NUM_THREADS is handed to the Rust pool as is: a billion would try to start a billion threads.
        check(self.threads is None or self.threads <= MAX_THREADS,
              f"--threads must be at most {MAX_THREADS} (got {self.threads})")
        check_number(self.tokenizer_train_mb, "--tokenizer-train-mb", minimum=0, exclusive_minimum=True)
        check_seed(self.seed)
        if self.streaming is None:
            self.streaming = bool(self.dataset_size) and self.dataset_size in HUB_CONFIGS and (
                HUB_CONFIGS.index(self.dataset_size) >= HUB_CONFIGS.index(STREAMING_FROM))
        if self.name is None:
            if self.dataset_size:
                self.name = f"chunked_{self.dataset_size}"
            else:
                stem = Path(self.data_files[0]).name.split(".")[0].replace("*", "") or "custom"
                self.name = f"chunked_{stem}"


@dataclass
class Source:
    """Where the documents come from: train texts, the source's own test texts (if any), a description."""

    description: dict[str, Any]
    train: Callable[[], Iterator[str]]
    test: Callable[[], Iterator[str]] | None
    local: bool = False  # files on this machine: reading the first documents a second time costs nothing


def resolve_source(cfg: PreprocessConfig) -> Source:
    if cfg.data_files:
        files = expand_data_files(cfg.data_files)
        return Source(
            {"type": "files", "files": [str(f) for f in files], "text_column": cfg.text_column},
            lambda: iter_local_texts(files, cfg.text_column, cfg.sample_by), None, local=True)
    if cfg.dataset_size == "builtin":
        from .sample import builtin_sample_path  # the shipped sample, a .jsonl file

        path = builtin_sample_path()
        return Source({"type": "builtin", "files": [path.name]},
                      lambda: iter_local_texts([path], "text", cfg.sample_by), None, local=True)
    size = cfg.dataset_size
    assert size is not None and cfg.streaming is not None
    stream = cfg.streaming
    from .data import hub_split_names

    name = cfg.dataset_name
    splits = hub_split_names(name, size)
    check("train" in splits, f"{name} config '{size}' has no train split (it has: {', '.join(splits)})")
    return Source(
        {"type": "hub", "dataset": name, "config": size, "streaming": stream},
        lambda: iter_hub_texts(name, size, "train", cfg.text_column, stream),
        (lambda: iter_hub_texts(name, size, "test", cfg.text_column, stream)) if "test" in splits else None)


def carve(texts: Iterator[str], fraction: float, seed: int, want_test: bool) -> Iterator[str]:
    """The training (or, with want_test, the held-out) documents of a seeded per-document split.

    Decided document by document from a seeded RNG, so the streamed and the in-memory paths agree and the
    tokenizer is trained on exactly the documents that end up in train.
    """
    rng = random.Random(seed)
    for text in texts:
        if (rng.random() < fraction) == want_test:
            yield text


def check_carve(texts: Iterator[str], fraction: float, seed: int, flag: str) -> None:
    """Refuse a carve that would leave the train or the test split without a document, before any real work.

    carve() sends document i to test when the i-th draw of random.Random(seed) is below `fraction`, so which
    split a document joins depends only on its position: a split stays empty exactly when the input ends
    before the first draw that would feed it. Reading documents until both splits have had one therefore
    decides it; that is the first document or two for train and about 1/fraction for test (10 at the
    default 0.1). Measured on ../shared/data/dutch (4,252 documents, 2 cores): this reads 2 of them in 0.2 ms,
    where counting every document first would be a full extra pass of 0.21 s (on a run of 1.3-1.4 s), and
    counting during tokenizer training would come too late (it reads at most --tokenizer-train-mb, and the
    training itself is the cost to avoid). One 10 MB document used to fail after 28 s and 2.5 GB; one of
    50 MB is now refused after 4.9 s (3.9 s of it importing transformers) at 0.55 GB.
    """
    rng = random.Random(seed)
    seen = {True: False, False: False}  # held out?
    n = 0
    for _ in texts:
        n += 1
        seen[rng.random() < fraction] = True
        if all(seen.values()):
            return
    check(n > 0, "no text found in the input: every document is empty")
    split = "train" if seen[True] else "test"
    raise UsageError(f"the {split} split would get none of the {n} documents ({flag} {fraction} with --seed {seed}: "
                     f"documents are held out whole, drawn one by one); use more documents, another --seed"
                     + (" or a larger --test-split" if split == "test" else ""))


@dataclass
class SplitStats:
    documents: int = 0
    words: int = 0
    bytes: int = 0
    tokens: int = 0
    chunks: int = 0
    dropped_tokens: int = 0


class SplitEncoder:
    """Appends the token ids of one split's documents, with EOS after each, to that split's ChunkWriter."""

    def __init__(self, eos_token_id: int, writer: ChunkWriter):
        self.eos = eos_token_id
        self.writer = writer
        self.stats = SplitStats()

    def add(self, texts: list[str], ids: list[list[int]]) -> int:
        import numpy as np  # here, not at the top: building the CLI's parser imports this module

        eos = (self.eos,)
        n_tokens = sum(map(len, ids)) + len(ids)
        flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, eos) for x in ids),
                           dtype=self.writer.dtype, count=n_tokens)
        self.writer.add(flat)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        s = self.stats
        s.documents += len(texts)
        s.words += sum(len(t.split()) for t in texts)
        s.bytes += nbytes
        s.tokens += n_tokens
        return nbytes

    def finish(self) -> SplitStats:
        self.stats.dropped_tokens = self.writer.finish()
        self.stats.chunks = self.writer.chunks
        return self.stats


def encode_texts(texts: Iterator[str], encode: BatchEncoder, encoders: dict[str, SplitEncoder],
                 route: Callable[[], str] | None, desc: str) -> None:
    """Tokenize `texts` into `encoders`; `route()` names the split of each document (default: the only one).

    Pipelined: the Rust encoder (which releases the GIL and uses every core) works on batch k+1 in a
    worker thread while this thread reads the text of batch k+2 and packs the ids of batch k, so the
    Python-side work (JSON, packing, counting: ~0.5 CPU-s per 14 MB) overlaps with encoding instead of
    following it. On 2 cores it still competes for CPU (`gpt2-dutch bench preprocess` shows how much).
    """
    from tqdm.auto import tqdm

    only = next(iter(encoders.values()))

    def collect(batch: list[str], future: Future) -> int:
        ids = future.result()
        if route is None:
            return only.add(batch, ids)
        parts: dict[str, tuple[list[str], list[list[int]]]] = {name: ([], []) for name in encoders}
        for text, doc_ids in zip(batch, ids, strict=True):
            part = parts[route()]
            part[0].append(text)
            part[1].append(doc_ids)
        return sum(encoders[name].add(*part) for name, part in parts.items() if part[0])

    with ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(desc=desc, unit="B", unit_scale=True, dynamic_ncols=True, mininterval=0.5) as bar:
        pending: tuple[list[str], Future] | None = None
        for batch in batched(texts):
            future = pool.submit(encode, batch)
            if pending is not None:
                bar.update(collect(*pending))
            pending = (batch, future)
        if pending is not None:
            bar.update(collect(*pending))


def preprocess(cfg: PreprocessConfig) -> Path:
    """Run the whole stage; return the finished dataset directory."""
    start = time.perf_counter()
    if cfg.threads:
        os.environ["RAYON_NUM_THREADS"] = str(cfg.threads)  # read when the Rust thread pool starts
    out_root = Path(cfg.output_dir)
    final = out_root / str(cfg.name)
    check_replaceable(final, cfg.overwrite)
    # The directories this run creates, removed again (when empty) if it fails: a failed run leaves nothing.
    created = [p for p in (out_root, *out_root.parents) if not p.exists()]
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output directory {out_root} ({e.strerror})") from None
    tmp = temp_name(final)
    try:
        check(os.access(out_root, os.W_OK), f"output directory {out_root} is not writable")
        remove_leftovers(out_root, str(cfg.name))
        source = resolve_source(cfg)
        with disk_faults(f"the dataset {final}"):
            manifest = _build(cfg, source, tmp, start)
            # Checked again: the build can take hours, and the path may have changed meanwhile.
            check_replaceable(final, cfg.overwrite)
            replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in created:
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                path.rmdir()
        raise
    _print_summary(manifest, final, time.perf_counter() - start)
    return final


def is_our_dataset(path: Path) -> bool:
    """Whether `path` is a directory (not a link) holding the manifest that preprocess writes."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == DATASET_FORMAT


def check_replaceable(final: Path, overwrite: bool) -> None:
    """Refuse to write `final` unless nothing is there, or (with --overwrite) a dataset of ours is.

    --overwrite deletes what it replaces, so it must never reach anything else: a user's folder that happens
    to have the name, a file, or (through a symbolic link) a directory somewhere else.
    """
    if not final.exists() and not final.is_symlink():
        return
    if not overwrite:
        raise UsageError(f"{final} already exists; pass --overwrite to replace it or --name to choose another")
    if final.is_symlink():
        raise UsageError(f"{final} is a symbolic link; --overwrite replaces only a dataset directory written by "
                         "gpt2-dutch preprocess, so remove the link yourself or choose another --name")
    if not final.is_dir():
        raise UsageError(f"{final} is a file, not a dataset; --overwrite replaces only a dataset directory, so "
                         "move the file away or choose another --name")
    if not is_our_dataset(final):
        raise UsageError(f"{final} is not a dataset written by gpt2-dutch preprocess (no {MANIFEST} of ours); "
                         "--overwrite will not delete it: move it away or choose another --name")


def remove_leftovers(out_root: Path, name: str) -> None:
    """Delete the temporary directories (`.NAME.tmp-PID`) of earlier runs for this dataset that were killed.

    A run's temporary directory is removed when it ends in any way but a kill; one whose process is gone (or
    carries our own id: we have not made ours yet, so it is from an earlier process that had this id) can
    never be finished. One of a live process is another run writing the same dataset now: left alone.
    """
    prefix = f".{name}.tmp-"
    for path in out_root.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):]
        if not pid.isdigit() or path.is_symlink() or not path.is_dir():
            continue
        if int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        print(f"note: removed the unfinished output of an earlier preprocess that was killed: {path}",
              file=sys.stderr)


def _build(cfg: PreprocessConfig, source: Source, tmp: Path, start: float) -> dict[str, Any]:
    tmp.mkdir(parents=True)
    fraction = cfg.test_split
    use_own_test = fraction is None and source.test is not None
    if fraction is None and not use_own_test:
        fraction = DEFAULT_CARVE_FRACTION

    def train_texts() -> Iterator[str]:
        return source.train() if fraction is None else carve(source.train(), fraction, cfg.seed, False)

    if fraction is not None and source.local:  # before the tokenizer is trained and anything is encoded
        check_carve(source.train(), fraction, cfg.seed,
                    "--test-split" if cfg.test_split is not None else "carving the test split as")
    tokenizer = _get_tokenizer(cfg, train_texts)
    trained = cfg.tokenizer is None
    if trained and len(tokenizer) < cfg.vocab_size:
        # The trainer stops when no pair of tokens occurs twice more: small or repetitive text cannot fill it.
        print(f"note: the training text supports only {len(tokenizer):,} tokens, not the {cfg.vocab_size:,} asked "
              f"for with --vocab-size; the tokenizer and the dataset have {len(tokenizer):,}", file=sys.stderr)
    encode = BatchEncoder(tokenizer, cfg.threads or os.cpu_count() or 1, cfg.encoder)
    dtype = token_dtype(len(tokenizer))
    stats: dict[str, SplitStats] = {}

    def new_encoder(split: str) -> SplitEncoder:
        return SplitEncoder(tokenizer.eos_token_id, ChunkWriter(tmp / split, split, cfg.chunk_size, dtype))

    if use_own_test:
        assert source.test is not None
        enc = new_encoder("test")
        encode_texts(source.test(), encode, {"test": enc}, None, "tokenize test")
        stats["test"] = enc.finish()
        if stats["test"].chunks == 0:
            print(f"note: the dataset's test split has {stats['test'].tokens} tokens, fewer than one "
                  f"{cfg.chunk_size}-token chunk; carving {DEFAULT_CARVE_FRACTION:.0%} of train as the test "
                  "split instead", file=sys.stderr)
            shutil.rmtree(tmp / "test")
            del stats["test"]
            fraction = DEFAULT_CARVE_FRACTION
    encoders = {"train": new_encoder("train")}
    route = None
    if fraction is not None:
        encoders["test"] = new_encoder("test")
        rng = random.Random(cfg.seed)  # the same draw sequence as carve(): same documents held out

        def route() -> str:
            return "test" if rng.random() < fraction else "train"
    encode_texts(source.train(), encode, encoders, route, "tokenize train" + (" + test" if route else ""))
    for name, enc in encoders.items():
        stats[name] = enc.finish()

    train = stats["train"]
    check(train.documents > 0, "no text found in the input: every document is empty")
    check(train.chunks > 0, f"the train split has only {train.tokens} tokens, fewer than one "
          f"{cfg.chunk_size}-token chunk; use more text or a smaller --chunk-size")
    test = stats["test"]
    check(test.chunks > 0, f"the test split has only {test.tokens} tokens, fewer than one {cfg.chunk_size}-"
          "token chunk; use a larger --test-split, more text or a smaller --chunk-size")

    tokenizer.model_max_length = cfg.chunk_size
    tokenizer.save_pretrained(str(tmp))
    (tmp / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    elapsed = time.perf_counter() - start
    manifest = {
        "format": DATASET_FORMAT,
        "format_version": 1,
        "source": {**source.description,
                   "test_split": "own" if fraction is None else f"carved {fraction} of train (seed {cfg.seed})"},
        "tokenizer": {"origin": cfg.tokenizer or f"trained byte-level BPE (vocab {len(tokenizer)})",
                      "vocab_size": len(tokenizer),
                      **({"requested_vocab_size": cfg.vocab_size} if trained else {}),
                      "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
                      "encoded_with": encode.name},
        "vocab_size": len(tokenizer),
        "chunk_size": cfg.chunk_size,
        "dtype": dtype.name,
        "splits": {name: asdict(stats[name]) for name in ("train", "test")},
        "seconds": round(elapsed, 2),
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _get_tokenizer(cfg: PreprocessConfig, train_texts: Callable[[], Iterator[str]]) -> Any:
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    budget = int(cfg.tokenizer_train_mb * 1e6)

    def sample() -> Iterator[str]:
        seen = 0
        for text in train_texts():
            # Long documents go in as pieces cut where the pre-tokenizer splits anyway: the same word counts,
            # so the same BPE, without the trainer's per-byte bookkeeping for a whole 50 MB text at once.
            yield from split_long_text(text)
            seen += len(text.encode("utf-8"))
            if seen >= budget:
                return

    return train_bpe(sample(), cfg.vocab_size)


def _print_summary(manifest: dict[str, Any], path: Path, seconds: float) -> None:
    splits = manifest["splits"]
    total_bytes = sum(s["bytes"] for s in splits.values())
    docs = sum(s["documents"] for s in splits.values())
    tokens = sum(s["tokens"] for s in splits.values())
    per_split = ", ".join(f"{n} {s['chunks']:,} ({s['dropped_tokens']} tokens dropped)" for n, s in splits.items())
    print(f"preprocessed {docs:,} documents, {tokens:,} tokens -> {manifest['chunk_size']}-token chunks: "
          f"{per_split}; {total_bytes / 1e6 / seconds:.1f} MB/s in {seconds:.1f} s -> {path}")
