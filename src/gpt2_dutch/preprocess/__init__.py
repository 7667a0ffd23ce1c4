"""Preprocess Dutch text into training-ready token chunks (run once; training never tokenizes).

    gpt2-dutch preprocess --dataset-size 10k                        # Hub config -> processed_data/chunked_10k
    gpt2-dutch preprocess --data-files 'corpus/*.jsonl.gz'          # local text, works offline, every core
    gpt2-dutch preprocess --dataset-size 10B --tokenizer processed_data/chunked_1B   # streamed, shared BPE
    gpt2-dutch preprocess --dataset-size 55B --tokenizer T --shard-index $SLURM_ARRAY_TASK_ID --num-shards 8
    gpt2-dutch preprocess --dataset-size 55B --tokenizer T --merge  # after the 8 tasks: one dataset

Steps: read documents -> train (or load) a byte-level BPE on the training split -> cut the input into parts
(preprocess_parts.py) -> --num-workers processes encode the parts (tiktoken's Rust encoder for GPT-2-style BPEs,
checked to give the same ids as `tokenizers`), <|endoftext|> after every document, each part into a file of
its own -> join the parts in input order, hold out the test documents, cut the stream into --chunk-size blocks
(no padding, final partial block dropped) and write Arrow shards into a temporary directory
(preprocess_merge.py) -> rename it into place with its manifest and tokenizer. A killed run, started again
with the same command, encodes only the parts it had not finished; the output is the same for any number of
workers, shards or part sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gpt2_dutch import __version__
from gpt2_dutch.core.errors import BAR_DELAY_S, MachineError, UsageError, check, check_number, check_seed, disk_faults
from gpt2_dutch.core.files import pid_alive, replace_dir, temp_name
from gpt2_dutch.core.options import option, renamed_notice
from gpt2_dutch.core.ownership import DirectoryOwner, remove_dead_staging
from gpt2_dutch.core.reading import read_json_or_none
from gpt2_dutch.data.chunks import MANIFEST, token_dtype
from gpt2_dutch.data.sources import (
    HUB_CONFIGS,
    HUB_DATASET,
    STREAMING_FROM,
    expand_data_files,
    iter_hub_texts,
    iter_local_texts,
)
from gpt2_dutch.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    ENCODERS,
    MIN_VOCAB_SIZE,
    TokenizerFiles,
    load_tokenizer_files,
    split_long_text,
    train_bpe,
)
from gpt2_dutch.preprocess.merge import SPLITS, WorkDir, merge_parts, stats_dict, tokenizer_digest
from gpt2_dutch.preprocess.parts import Part, encode_part, file_parts, init_worker, part_key, shard_of, text_block_parts

MAX_CHUNK_SIZE = 1 << 20
MAX_THREADS = 1024
MAX_SHARDS = 100_000
MAX_PART_MB = 4096.0
MAX_NAME_BYTES = 200
DATASET_FORMAT = "gpt2-dutch/chunks"  # the manifest's "format": what --overwrite may replace
# Fraction of training documents held out when a source has no (big enough) test split of its own.
DEFAULT_CARVE_FRACTION = 0.1


def available_cores() -> int:
    """The cores this process may run on (a Slurm allocation or taskset, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class PreprocessConfig:
    dataset_size: str | None = option(
        None, f"config of {HUB_DATASET} to download: {', '.join(HUB_CONFIGS)} (whitespace words); "
        "default 10k unless --data-files or --sample is given")
    sample: bool = option(False, "the small Dutch sample shipped with the package instead (no download)")
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
    num_workers: int | None = option(
        None, "processes encoding parts of the input at once (default: every core this process may use)")
    threads: int | None = option(None, "tokenizer threads per worker (default: the cores left per worker, at least 1)",
                                 aliases=["--num-proc"])
    part_mb: float | None = option(
        None, "MB of input text per part: the unit of work, of resuming after a kill and of splitting across "
        "machines (default: 1/64 of the input rounded down to a power of two, 1 to 32 MB; the output does not "
        "depend on it)")
    shard_index: int | None = option(
        None, "encode only this shard's parts (0 .. --num-shards - 1), e.g. $SLURM_ARRAY_TASK_ID; then --merge")
    num_shards: int | None = option(None, "how many shards (machines, Slurm array tasks) share the work")
    merge: bool = option(False, "join the parts that every shard wrote into the dataset (after all shards are done)")
    encoder: str = option(
        "auto", "auto: tiktoken's encoder (3x faster, same ids) when the tokenizer is a GPT-2-style byte-level "
        "BPE, checked on the first documents; tokenizers: always the tokenizer's own encoder", choices=ENCODERS)
    output_dir: str = option("processed_data", "where datasets are written")
    name: str | None = option(None, "dataset directory name (default chunked_<size> or chunked_<file stem>)")
    overwrite: bool = option(False, "replace an existing dataset of the same name")
    seed: int = option(42, "seed for carving a test split")

    def __post_init__(self) -> None:
        if self.dataset_size == "builtin":  # the old spelling of --sample: the shipped sample is not a size
            renamed_notice("gpt2-dutch preprocess", "--dataset-size builtin", "--sample")
            self.sample, self.dataset_size = True, None
        check(not (self.sample and (self.dataset_size or self.data_files)),
              "give one of --sample, --dataset-size or --data-files")
        if self.dataset_size is None and not self.data_files and not self.sample:
            self.dataset_size = "10k"
        check(not (self.dataset_size and self.data_files), "give either --dataset-size or --data-files, not both")
        if self.dataset_size and self.dataset_name == HUB_DATASET:
            sizes = {s.lower(): s for s in HUB_CONFIGS}
            check(self.dataset_size.lower() in sizes, f"unknown --dataset-size '{self.dataset_size}'; valid "
                  f"sizes: {', '.join(HUB_CONFIGS)} (or --sample for the shipped one)")
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
        check(self.num_workers is None or self.num_workers >= 1,
              f"--num-workers must be at least 1 (got {self.num_workers})")
        check(self.num_workers is None or self.num_workers <= MAX_THREADS,
              f"--num-workers must be at most {MAX_THREADS} (got {self.num_workers})")
        check_number(self.part_mb, "--part-mb", minimum=0, exclusive_minimum=True, maximum=MAX_PART_MB)
        check(self.num_shards is None or 1 <= self.num_shards <= MAX_SHARDS,
              f"--num-shards must be between 1 and {MAX_SHARDS} (got {self.num_shards})")
        check(not (self.merge and self.shard_index is not None),
              "--merge joins the work of every shard; give it without --shard-index")
        if self.shard_index is not None:
            check(self.num_shards is not None, "--shard-index needs --num-shards (how many shards share the work)")
            assert self.num_shards is not None
            check(0 <= self.shard_index < self.num_shards, f"--shard-index must be between 0 and "
                  f"{self.num_shards - 1} for --num-shards {self.num_shards} (got {self.shard_index})")
        check(self.num_shards is None or self.shard_index is not None or self.merge,
              "--num-shards needs --shard-index (this shard's number, e.g. $SLURM_ARRAY_TASK_ID) or --merge")
        check(not (self.num_shards or 1) > 1 or self.tokenizer is not None or self.merge,
              "shards must all encode with one tokenizer: train or choose it first (e.g. preprocess a smaller "
              "config) and pass it to every shard with --tokenizer")
        check_number(self.tokenizer_train_mb, "--tokenizer-train-mb", minimum=0, exclusive_minimum=True)
        check_seed(self.seed)
        if self.streaming is None:
            self.streaming = bool(self.dataset_size) and self.dataset_size in HUB_CONFIGS and (
                HUB_CONFIGS.index(self.dataset_size) >= HUB_CONFIGS.index(STREAMING_FROM))
        if self.name is not None:
            check_name(self.name)
        else:
            if self.sample:
                self.name = "chunked_builtin"  # the name --dataset-size builtin gave it
            elif self.dataset_size:
                self.name = f"chunked_{self.dataset_size}"
            else:
                stem = Path(self.data_files[0]).name.split(".")[0].replace("*", "") or "custom"
                cut = stem.encode("utf-8", "surrogateescape")[:MAX_NAME_BYTES - len("chunked_")]
                self.name = "chunked_" + cut.decode("utf-8", "ignore")


def check_name(name: str) -> None:
    """--name is a directory name inside --output-dir, never a path: no separator, not . or .., not empty, at most
    MAX_NAME_BYTES in UTF-8 (file systems allow 255, and the hidden names beside it add a few)."""
    shown = repr(name[:60]) + ("..." if len(name) > 60 else "")
    check(name != "", "--name must not be empty; give a directory name such as chunked_mine")
    check(not any(ord(c) < 32 or ord(c) == 127 for c in name),
          f"--name {shown} must be a plain directory name (no control characters)")
    check("/" not in name and not (os.altsep and os.altsep in name),
          f"--name {shown} must be a plain directory name (no /); where it goes is --output-dir")
    check(name not in (".", ".."), f"--name {shown} must be a plain directory name, not . or ..")
    size = len(name.encode("utf-8", "surrogatepass"))
    check(size <= MAX_NAME_BYTES, f"--name is {size} bytes long; at most {MAX_NAME_BYTES} (UTF-8) are allowed")



@dataclass
class Source:
    """Where the documents come from: train texts, the source's own test texts (if any), a description, and
    the parts of each split (preprocess_parts.Part) in input order."""

    description: dict[str, Any]
    train: Callable[[], Iterator[str]]
    test: Callable[[], Iterator[str]] | None
    local: bool = False  # files on this machine: reading the first documents a second time costs nothing
    # (split, part bytes, shard index, number of shards) -> the parts of that split that are this shard's
    parts: Callable[[str, int, int, int], Iterator[Part]] | None = None
    signature: list[Any] | None = None  # what identifies the input in plan.json (files: their paths)
    text_bytes: int | None = None  # about how much text there is (gzip counted 3x), where known up front


def resolve_source(cfg: PreprocessConfig) -> Source:
    if cfg.data_files:
        files = expand_data_files(cfg.data_files)
        return _file_source(files, {"type": "files", "files": [str(f) for f in files], "text_column": cfg.text_column},
                            cfg)
    if cfg.sample:
        from gpt2_dutch.data.sample import builtin_sample_path  # the shipped sample, a .jsonl file

        path = builtin_sample_path()
        return _file_source([path], {"type": "builtin", "files": [path.name]}, cfg, text_column="text")
    size = cfg.dataset_size
    assert size is not None and cfg.streaming is not None
    stream = cfg.streaming
    from gpt2_dutch.data.sources import hub_split_names, load_hub_split

    name = cfg.dataset_name
    splits = hub_split_names(name, size)
    check("train" in splits, f"{name} config '{size}' has no train split (it has: {', '.join(splits)})")

    def parts(split: str, part_bytes: int, index: int, n: int) -> Iterator[Part]:
        if stream:  # one part per data file, each read by its worker straight from the Hub
            n_files = load_hub_split(name, size, split, True).n_shards
            for k in range(n_files):
                if shard_of(n_files, k, 0, n) == index:
                    yield Part(split, part_key(k, 0), "hub", 0, hub=(name, size, split, k, n_files),
                               check=f"{name}/{size}/{split}/{k}/{n_files}")
            return
        texts = iter_hub_texts(name, size, split, cfg.text_column, False)
        yield from text_block_parts(texts, split, part_bytes, lambda f, b: shard_of(1, f, b, n) == index)

    return Source(
        {"type": "hub", "dataset": name, "config": size, "streaming": stream},
        lambda: iter_hub_texts(name, size, "train", cfg.text_column, stream),
        (lambda: iter_hub_texts(name, size, "test", cfg.text_column, stream)) if "test" in splits else None,
        parts=parts, signature=[name, size, stream])


def _file_source(files: list[Path], description: dict[str, Any], cfg: PreprocessConfig,
                 text_column: str | None = None) -> Source:
    column = text_column or cfg.text_column

    def parts(split: str, part_bytes: int, index: int, n: int) -> Iterator[Part]:
        return file_parts(files, split, column, cfg.sample_by, part_bytes,
                          lambda f, b: shard_of(len(files), f, b, n) == index,
                          lambda f: len(files) < n or f % n == index)

    size = sum(f.stat().st_size * (3 if f.name.lower().endswith(".gz") else 1) for f in files)
    return Source(description, lambda: iter_local_texts(files, column, cfg.sample_by), None, local=True,
                  parts=parts, signature=[str(f) for f in files], text_bytes=size)


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
    decides it: the first document or two for train and about 1/fraction for test (10 at the default 0.1),
    where counting every document first would be a full extra pass, and counting during tokenizer training
    would come too late (the training itself is the cost to avoid). Measured in docs/experiments/preprocess-speed.md.
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



def preprocess(cfg: PreprocessConfig) -> Path:
    """Run the whole stage; return the finished dataset directory (a shard of several: its work directory)."""
    start = time.perf_counter()
    out_root = Path(cfg.output_dir)
    final = out_root / str(cfg.name)
    check_replaceable(final, cfg.overwrite)
    # The directories this run creates, removed again (when empty) if it fails: a failed run leaves nothing.
    created = [p for p in (out_root, *out_root.parents) if not p.exists()]
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output directory {out_root} ({e.strerror})") from None
    # One writer per dataset name (OUTPUT_DIR/.NAME.lock): the shards of one run share it, a whole run or a merge
    # has it alone. Taken before anything is looked at or removed, so a run refused here touches nothing.
    shard_of_several = (cfg.num_shards or 1) > 1 and not cfg.merge
    owner = DirectoryOwner(final, "preprocess", shared=shard_of_several)
    tmp = temp_name(final)
    work = WorkDir(out_root / f".{cfg.name}.work")
    work_is_new = False
    try:
        check(os.access(out_root, os.W_OK), f"output directory {out_root} is not writable")
        owner.acquire()
        work_is_new = not work.path.exists()
        remove_leftovers(out_root, str(cfg.name))
        check_replaceable(final, cfg.overwrite)  # again: another run may have finished it, or a leftover put back
        with disk_faults(f"the dataset {final}"):
            done = _run(cfg, work, tmp, final, start)
    except BaseException as e:
        if owner.held:
            shutil.rmtree(tmp, ignore_errors=True)
            work.release()
            owner.release()
            # Finished parts (and a trained tokenizer) stay for the next run, unless the input itself cannot give
            # a dataset (too little text: another command is needed) or there is nothing finished to keep. The
            # shards of a run share the work directory: only one that has the name to itself may remove it.
            if work_is_new and (not work.has_results() or isinstance(e, Unmergeable)):
                with contextlib.suppress(UsageError), DirectoryOwner(final, "preprocess"):
                    work.remove()
        for path in created:
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                path.rmdir()
        raise
    owner.release()
    return done


class Unmergeable(UsageError):
    """The parts are complete but cannot make a dataset (too few tokens): rerunning the command cannot help."""


def _run(cfg: PreprocessConfig, work: WorkDir, tmp: Path, final: Path, start: float) -> Path:
    source = resolve_source(cfg)
    tokenizer = load_tokenizer_files(cfg.tokenizer) if cfg.tokenizer else None
    index, n_shards = cfg.shard_index or 0, cfg.num_shards or 1
    if cfg.merge:
        check(work.path.is_dir(), f"nothing to merge: {work.path} does not exist; run the shards first (the same "
              "command with --shard-index I --num-shards N)")
    work.open(_plan(cfg, source, tokenizer), "merge" if cfg.merge else f"{index:05d}-of-{n_shards:05d}",
              discard_other=n_shards == 1 and not cfg.merge)
    fraction = cfg.test_split
    if fraction is None and source.test is None:
        fraction = DEFAULT_CARVE_FRACTION
    if fraction is not None and source.local and not cfg.merge:  # before the tokenizer is trained
        check_carve(source.train(), fraction, cfg.seed,
                    "--test-split" if cfg.test_split is not None else "carving the test split as")
    if tokenizer is None:
        tokenizer = _get_tokenizer(cfg, source, fraction, work)
    dtype = token_dtype(len(tokenizer))
    if not cfg.merge:
        keys, reused, seconds = _encode_parts(cfg, source, work, tokenizer, dtype.name, index, n_shards)
        work.mark_done(index, n_shards, keys, source.test is not None)
        if n_shards > 1:
            print(f"shard {index} of {n_shards} done: {sum(map(len, keys.values()))} parts ({reused} from an earlier "
                  f"run) in {seconds:.1f} s, in "
                  f"{work.path}; when every shard is done, run the same command with --merge instead of "
                  "--shard-index", file=sys.stderr)
            work.release()
            return work.path
    else:
        reused, seconds = 0, 0.0
    n_shards, keys, has_test = work.shard_results(cfg.num_shards if cfg.merge else n_shards)
    tmp.mkdir(parents=True)
    merged = merge_parts(work, tmp, keys, has_test, cfg.chunk_size, dtype, cfg.test_split, cfg.seed,
                         DEFAULT_CARVE_FRACTION)
    stats = merged.stats
    train, test = stats["train"], stats["test"]
    if train.documents == 0:
        raise Unmergeable("no text found in the input: every document is empty")
    if train.chunks == 0:
        raise Unmergeable(f"the train split has only {train.tokens} tokens, fewer than one {cfg.chunk_size}-token "
                          "chunk; use more text or a smaller --chunk-size")
    if test.chunks == 0:
        raise Unmergeable(f"the test split has only {test.tokens} tokens, fewer than one {cfg.chunk_size}-token "
                          "chunk; use a larger --test-split, more text or a smaller --chunk-size")
    tokenizer.save(tmp, cfg.chunk_size)
    (tmp / "dataset_dict.json").write_text(json.dumps({"splits": list(SPLITS)}))
    trained = cfg.tokenizer is None
    elapsed = time.perf_counter() - start
    fraction = merged.fraction
    manifest = {
        "format": DATASET_FORMAT,
        "format_version": 1,
        "source": {**source.description,
                   "test_split": "own" if fraction is None else f"carved {fraction} of train (seed {cfg.seed})"},
        "tokenizer": {"origin": cfg.tokenizer or f"trained byte-level BPE (vocab {len(tokenizer)})",
                      "vocab_size": len(tokenizer),
                      **({"requested_vocab_size": cfg.vocab_size} if trained else {}),
                      "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
                      "encoded_with": ", ".join(merged.encoders) or "tiktoken"},
        "vocab_size": len(tokenizer),
        "chunk_size": cfg.chunk_size,
        "dtype": dtype.name,
        "splits": stats_dict(stats),
        "parts": {split: len(keys[split]) for split in SPLITS},
        "shards": n_shards,
        "seconds": round(elapsed, 2),
        # from the first part started to the last one finished, in this run: the steady state, start-up excluded
        "encode_seconds": round(seconds, 3),
        "workers": cfg.num_workers or available_cores(),
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    # Checked again: the build can take hours, and the path may have changed meanwhile.
    check_replaceable(final, cfg.overwrite)
    replace_dir(tmp, final)
    work.remove()
    _print_summary(manifest, final, time.perf_counter() - start, reused)
    return final


def _plan(cfg: PreprocessConfig, source: Source, tokenizer: TokenizerFiles | None) -> dict[str, Any]:
    """What the parts (and a trained tokenizer) depend on: work recorded under another plan is not reused."""
    plan: dict[str, Any] = {"source": source.signature, "text_column": cfg.text_column, "sample_by": cfg.sample_by,
                            "encoder": cfg.encoder, "part_bytes": part_bytes(cfg, source)}
    if tokenizer is not None:
        plan["tokenizer"] = tokenizer_digest(tokenizer.backend.to_str())
    else:  # trained here, on the training documents: what decides them decides the BPE
        plan["tokenizer"] = {"vocab_size": cfg.vocab_size, "train_mb": cfg.tokenizer_train_mb,
                             "test_split": cfg.test_split, "seed": cfg.seed}
    return plan


def part_bytes(cfg: PreprocessConfig, source: Source) -> int:
    """--part-mb, or by default 1/64 of the input (gzip counted as 3x its size) in 1, 2, 4, 8, 16 or 32 MB:
    enough parts for every core on a file of a few MB, few enough part files at hundreds of GB. A power of two,
    so that fixing a line of the input keeps the part size (and the parts before the fix); never the number of
    workers, which the output must not depend on (it does not depend on the part size either)."""
    if cfg.part_mb is not None:
        return max(1, int(cfg.part_mb * 1e6))
    if source.text_bytes is None:
        return 32 * 2**20
    return 2 ** min(25, max(20, (source.text_bytes // 64).bit_length() - 1))


def _encode_parts(cfg: PreprocessConfig, source: Source, work: WorkDir, tokenizer: TokenizerFiles, dtype: str,
                  index: int, n_shards: int) -> tuple[dict[str, list[str]], int, float]:
    """Encode this shard's parts that are not done yet on --num-workers processes; return the keys of all its
    parts per split, how many were done by an earlier run, and the seconds from the first part started to the last
    one ended."""
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    workers = cfg.num_workers or available_cores()
    threads = cfg.threads or max(1, available_cores() // workers)
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when a worker's Rust thread pool starts
    done = {split: work.done_keys(split) for split in SPLITS}
    keys: dict[str, list[str]] = {split: [] for split in SPLITS}
    size = part_bytes(cfg, source)
    reused = 0

    def todo() -> Iterator[Part]:
        nonlocal reused
        for split in (["test"] if source.test is not None else []) + ["train"]:
            assert source.parts is not None
            for part in source.parts(split, size, index, n_shards):
                keys[split].append(part.key)
                if part.key not in done[split] or work.part_check(split, part.key) != part.check:
                    yield part
                else:
                    reused += 1

    # fork: a worker starts in milliseconds with what this process has loaded, where forkserver or spawn import it
    # all again. The pool forks its processes at the first submit, before it starts its own threads; a worker with
    # one encoder thread never touches the Rust thread pool a fork cannot copy (init_worker). Workers with several
    # threads start from a fresh process instead. Either way no worker keeps the dataset's lock (core/ownership.py
    # closes it in a forked child; exec does not pass it on) or outlives this process (init_worker).
    methods = multiprocessing.get_all_start_methods()
    fresh = "forkserver" if "forkserver" in methods else "spawn"
    context = multiprocessing.get_context("fork" if "fork" in methods and threads == 1 else fresh)
    init = (tokenizer.backend.to_str(), tokenizer.eos_token_id, dtype, cfg.encoder, threads, cfg.text_column,
            cfg.sample_by, str(work.parts), os.getpid())
    first, last = float("inf"), 0.0
    pending: deque[tuple[Part, Future]] = deque()
    n_new = 0
    bar: Any = None

    def collect() -> None:
        nonlocal first, last, n_new
        part, future = pending.popleft()
        try:
            result = future.result()
        except BrokenProcessPool:
            raise MachineError(f"a preprocess worker died (killed, or out of memory?) while encoding part {part.key} "
                               f"({part.path or part.split}); the parts already done are kept: run the same command "
                               "again to continue") from None
        first, last = min(first, result["start"]), max(last, result["end"])
        n_new += 1
        bar.update(result["nbytes"])

    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=init) as pool:
        try:
            for part in todo():
                pending.append((part, pool.submit(encode_part, part)))
                if bar is None:  # after the first submit forked the workers: tqdm's monitor thread is not copied
                    bar = tqdm(desc="tokenize", unit="B", unit_scale=True, dynamic_ncols=True, mininterval=0.5,
                               delay=BAR_DELAY_S)
                while len(pending) > workers:  # every worker busy and one part queued: memory stays bounded
                    collect()
            while pending:
                collect()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # parts already running finish and are kept
            raise
        finally:
            if bar is not None:
                bar.close()
    return keys, reused, max(0.0, last - first)


def is_our_dataset(path: Path) -> bool:
    """Whether `path` is a directory (not a link) holding the manifest that preprocess writes."""
    if path.is_symlink() or not path.is_dir():
        return False
    manifest = read_json_or_none(path / MANIFEST)  # a FIFO or a huge file there is not ours either
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
    foreign = not_written_by_us(final)
    if foreign:
        if len(foreign) > 3:
            shown = ", ".join(foreign[:3]) + f" and {len(foreign) - 3} more"
        else:
            shown = " and ".join(filter(None, [", ".join(foreign[:-1]), foreign[-1]]))
        them = "it" if len(foreign) == 1 else "them"
        raise UsageError(f"{final} holds {shown} that preprocess did not write; move {them} or choose another --name")


# What a dataset directory holds when preprocess wrote it: --overwrite deletes nothing else. The tokenizer files
# are those that TokenizerFiles.save and transformers' save_pretrained write; cache-*.arrow files are what
# `datasets` adds beside a split when a loaded dataset is mapped (derived from ours, and rebuilt when needed).
_TOP_FILES = {MANIFEST, "dataset_dict.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja"}
_SPLIT_FILE = re.compile(r"data-\d{5}-of-\d{5}\.arrow|cache-[0-9a-f]+\.arrow|state\.json|dataset_info\.json")


def not_written_by_us(path: Path) -> list[str]:
    """What `path` (a dataset directory) holds that preprocess does not write, as sorted relative names (a
    directory with a trailing /); links are never ours."""
    foreign = []
    for entry in sorted(path.iterdir()):
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.name in SPLITS and entry.is_dir():
            for inner in sorted(entry.iterdir()):
                if inner.is_symlink() or not inner.is_file() or not _SPLIT_FILE.fullmatch(inner.name):
                    foreign.append(f"{entry.name}/{inner.name}" + ("/" if inner.is_dir() else ""))
        elif entry.name not in _TOP_FILES or not entry.is_file():
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def remove_leftovers(out_root: Path, name: str) -> None:
    """Clear what earlier runs for this dataset left when they were killed (called while owning the name).

    `.NAME.tmp-PID`, a dataset being written, is deleted when its process is gone (or carries our own id: we
    have not made ours yet, so it is from an earlier process that had this id); one of a live process is left
    alone. `.NAME.old-PID` is the dataset an --overwrite set aside to replace: deleted if the new one is in
    place, else (killed between the two renames) put back.
    """
    final = out_root / name
    for path in remove_dead_staging(out_root, f".{name}.tmp-"):
        print(f"note: removed the unfinished output of an earlier preprocess that was killed: {path}",
              file=sys.stderr)
    prefix = f".{name}.old-"
    for path in sorted(out_root.glob(f"{glob.escape(prefix)}*")):
        pid = path.name[len(prefix):]
        if not pid.isdigit() or path.is_symlink() or not path.is_dir() or (
                int(pid) != os.getpid() and pid_alive(int(pid))):
            continue
        if final.exists() or final.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif is_our_dataset(path):
            path.rename(final)
            print(f"note: put back {final}, which an earlier preprocess --overwrite that was killed had set aside "
                  f"as {path.name}", file=sys.stderr)


def _get_tokenizer(cfg: PreprocessConfig, source: Source, fraction: float | None, work: WorkDir) -> TokenizerFiles:
    """Train the Dutch BPE on the training documents, once: it is kept in the work directory for a rerun."""
    if work.tokenizer_dir.is_dir():
        return load_tokenizer_files(str(work.tokenizer_dir))

    def sample() -> Iterator[str]:
        texts = source.train() if fraction is None else carve(source.train(), fraction, cfg.seed, False)
        seen = 0
        for text in texts:
            # Long documents go in as pieces cut where the pre-tokenizer splits anyway: the same word counts,
            # so the same BPE, without the trainer's per-byte bookkeeping for a whole 50 MB text at once.
            yield from split_long_text(text)
            seen += len(text.encode("utf-8"))
            if seen >= budget:
                return

    budget = int(cfg.tokenizer_train_mb * 1e6)
    tokenizer = train_bpe(sample(), cfg.vocab_size)
    if len(tokenizer) < cfg.vocab_size:
        # The trainer stops when no pair of tokens occurs twice more: small or repetitive text cannot fill it.
        print(f"note: the training text supports only {len(tokenizer):,} tokens, not the {cfg.vocab_size:,} asked "
              f"for with --vocab-size; the tokenizer and the dataset have {len(tokenizer):,}", file=sys.stderr)
    staging = work.path / f".tokenizer.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(str(staging))
    staging.rename(work.tokenizer_dir)
    return TokenizerFiles.of(tokenizer)


def _print_summary(manifest: dict[str, Any], path: Path, seconds: float, reused: int) -> None:
    splits = manifest["splits"]
    total_bytes = sum(s["bytes"] for s in splits.values())
    docs = sum(s["documents"] for s in splits.values())
    tokens = sum(s["tokens"] for s in splits.values())
    per_split = ", ".join(f"{n} {s['chunks']:,} ({s['dropped_tokens']} tokens dropped)" for n, s in splits.items())
    parts = sum(manifest["parts"].values())
    earlier = f"; {reused} of {parts} parts done by an earlier run" if reused else ""
    print(f"preprocessed {docs:,} documents, {tokens:,} tokens -> {manifest['chunk_size']}-token chunks: "
          f"{per_split}; {total_bytes / 1e6 / seconds:.1f} MB/s in {seconds:.1f} s{earlier} -> {path}")
