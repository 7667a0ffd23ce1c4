"""The work directory of a preprocess run, and the merge of its part files into one dataset.

    gpt2-dutch preprocess --data-files 'corpus/*.jsonl.gz' --tokenizer T --shard-index 3 --num-shards 8   # a task
    gpt2-dutch preprocess --data-files 'corpus/*.jsonl.gz' --tokenizer T --merge                         # then

`OUTPUT_DIR/.NAME.work/` outlives a killed run: it holds `plan.json` (the settings the parts depend on), the
trained tokenizer (if one was trained), `parts/SPLIT/KEY.npz` (each renamed into place once whole) and one
`done-I-of-N.json` per shard that finished its parts, listing them. A run started again with the same command
encodes only the parts that are missing; with other settings the old work is discarded (one notice). The merge
reads the parts in input order, draws each training document's split from random.Random(--seed) exactly as one
process reading the input would, cuts the token streams into chunks and writes the dataset under a temporary
name; only then is it renamed into place and the work directory removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpt2_dutch.core.errors import UsageError, check
from gpt2_dutch.core.files import write_json_atomic
from gpt2_dutch.core.ownership import DirectoryOwner
from gpt2_dutch.core.reading import read_json_or_none
from gpt2_dutch.data.chunks import ChunkWriter

WORK_FORMAT = "gpt2-dutch/preprocess-work"
SPLITS = ("train", "test")
DONE_SCHEMA = {"shard": int, "num_shards": int, "has_test": bool, "parts": {split: list for split in SPLITS}}


@dataclass
class SplitStats:
    documents: int = 0
    words: int = 0
    bytes: int = 0
    tokens: int = 0
    chunks: int = 0
    dropped_tokens: int = 0


class WorkDir:
    """`.NAME.work/` beside the dataset: what a killed run leaves for the next one to continue from."""

    def __init__(self, path: Path):
        self.path = path
        self.parts = path / "parts"
        self._lock: DirectoryOwner | None = None
        self._lock_path = path / "lock"

    @staticmethod
    def is_ours(path: Path) -> bool:
        """Whether `path` holds only what preprocess puts in a work directory (a run killed before it wrote
        plan.json leaves just some of it), so that discarding it never deletes anything else."""
        known = re.compile(r"plan\.json|parts|tokenizer|lock-.*|done-.*\.json|\..*\.tmp-.*")
        try:
            return all(known.fullmatch(p.name) for p in path.iterdir())
        except OSError:
            return False

    def open(self, plan: dict[str, Any], shard: str, discard_other: bool) -> None:
        """Create or adopt the directory for `plan`; lock it against a second run of the same shard."""
        plan = {"format": WORK_FORMAT, **plan}
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            raise UsageError(f"{self.path} is in the way of preprocess's work directory; move it away")
        if self.path.exists() and not self.is_ours(self.path):
            raise UsageError(f"{self.path} is not a work directory of gpt2-dutch preprocess; move it away or choose "
                             "another --name")
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock(shard)
        old = self.plan()
        if old is not None and old != plan:
            if not discard_other:
                self.release()
                raise UsageError(f"{self.path} holds the work of a preprocess with other settings ("
                                 f"{_first_difference(old, plan)}); run the shards with one command line, or "
                                 "remove it to start over")
            print(f"note: discarding the unfinished work of an earlier preprocess with other settings "
                  f"({_first_difference(old, plan)}): {self.path}", file=sys.stderr)
            for p in self.path.iterdir():
                if p.is_dir():
                    shutil.rmtree(p)
                elif p != self._lock_path:
                    p.unlink()
        if old != plan:
            write_json_atomic(self.path / "plan.json", plan)
        for split in SPLITS:
            (self.parts / split).mkdir(parents=True, exist_ok=True)

    def lock(self, shard: str) -> None:
        """One process per shard (core/ownership.py; the dataset name's lock already keeps whole runs apart)."""
        self._lock_path = self.path / f"lock-{shard}"
        self._lock = DirectoryOwner(self.path, f"preprocess (shard {shard})", lock_path=self._lock_path).acquire()

    def release(self) -> None:
        """Give up the lock (a kill gives it up too: the kernel drops a dead process's locks) and its file."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def plan(self) -> dict[str, Any] | None:
        plan = read_json_or_none(self.path / "plan.json")  # damaged or not ours: the work is started over
        return plan if isinstance(plan, dict) else None

    def done_keys(self, split: str) -> set[str]:
        return {p.name[:-4] for p in (self.parts / split).glob("f*.npz")}

    def part_path(self, split: str, key: str) -> Path:
        return self.parts / split / f"{key}.npz"

    def part_check(self, split: str, key: str) -> str | None:
        """What a part file was made from (Part.check), or None for a file that does not read as a part."""
        import numpy as np

        try:
            with np.load(self.part_path(split, key)) as z:
                return str(z["check"])
        except (OSError, ValueError, KeyError, EOFError):
            return None

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def has_results(self) -> bool:
        """Whether there is finished work worth keeping after a failure (a part, a trained tokenizer)."""
        return self.tokenizer_dir.is_dir() or any(self.done_keys(s) for s in SPLITS)

    def mark_done(self, index: int, num_shards: int, keys: dict[str, list[str]], has_test: bool) -> None:
        write_json_atomic(self.path / f"done-{index:05d}-of-{num_shards:05d}.json",
                          {"shard": index, "num_shards": num_shards, "has_test": has_test, "parts": keys})

    def shard_results(self, num_shards: int | None) -> tuple[int, dict[str, list[str]], bool]:
        """(N, the part keys of every split in input order, whether the source has its own test split) from the
        done markers of all N shards; a one-line error naming the shards that are not done."""
        markers: dict[int, dict[int, dict[str, Any]]] = {}
        for p in self.path.glob("done-*-of-*.json"):
            m = read_json_or_none(p, schema=DONE_SCHEMA)  # a damaged marker is a shard not done: it runs again
            if m is not None and all(isinstance(k, str) for v in m["parts"].values() for k in v):
                markers.setdefault(m["num_shards"], {})[m["shard"]] = m
        if num_shards is None:
            check(len(markers) <= 1, f"{self.path} holds shards of runs split {' and '.join(map(str, markers))} "
                  "ways; pass --num-shards to say which to merge")
            num_shards = next(iter(markers), 1)
        done = markers.get(num_shards, {})
        missing = [i for i in range(num_shards) if i not in done]
        if missing:
            listed = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise UsageError(f"{len(missing)} of {num_shards} shards are not done (--shard-index {listed}); run "
                             f"them (a killed one continues where it stopped), then --merge again")
        keys = {s: sorted({k for m in done.values() for k in m["parts"].get(s, [])}) for s in SPLITS}
        for split, split_keys in keys.items():
            absent = [k for k in split_keys if not self.part_path(split, k).is_file()]
            check(not absent, f"{self.part_path(split, absent[0]) if absent else ''} is missing although its shard "
                  "is done; run that shard again")
        return num_shards, keys, any(m["has_test"] for m in done.values())

    def remove(self) -> None:
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {json.dumps(old.get(key))[:80]} then, {json.dumps(new.get(key))[:80]} now"
    return "none"


def tokenizer_digest(backend_json: str) -> str:
    return hashlib.sha256(backend_json.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------ merge

@dataclass
class Merged:
    stats: dict[str, SplitStats]
    fraction: float | None  # carved from train with this fraction (None: the source's own test split)
    encoders: list[str]  # which encoder gave the ids, over all parts


def merge_parts(work: WorkDir, out: Path, keys: dict[str, list[str]], has_test: bool, chunk_size: int, dtype: Any,
                fraction: float | None, seed: int, carve_default: float) -> Merged:
    """Write train/ and test/ of the dataset under `out` from the part files, in input order."""
    import numpy as np

    encoders: set[str] = set()
    stats: dict[str, SplitStats] = {}
    writers: dict[str, ChunkWriter] = {}

    def writer(split: str) -> ChunkWriter:
        if split not in writers:
            writers[split] = ChunkWriter(out / split, split, chunk_size, dtype)
            stats[split] = SplitStats()
        return writers[split]

    def add(split: str, tokens: Any, doc_tokens: Any, doc_words: Any, doc_bytes: Any) -> None:
        writer(split).add(tokens)
        s = stats[split]
        s.documents += len(doc_tokens)
        s.tokens += int(doc_tokens.sum(dtype=np.int64))
        s.words += int(doc_words.sum(dtype=np.int64))
        s.bytes += int(doc_bytes.sum(dtype=np.int64))

    def parts(split: str) -> Any:
        for key in keys[split]:
            with np.load(work.part_path(split, key)) as z:
                encoders.add(str(z["encoder"]))
                yield z["tokens"], z["doc_tokens"], z["doc_words"], z["doc_bytes"]

    use_own_test = fraction is None and has_test
    if use_own_test:
        test_tokens = 0
        for split_key in keys["test"]:
            with np.load(work.part_path("test", split_key)) as z:
                test_tokens += int(z["doc_tokens"].sum(dtype=np.int64))
        if test_tokens < chunk_size:
            print(f"note: the dataset's test split has {test_tokens} tokens, fewer than one {chunk_size}-token chunk; "
                  f"carving {carve_default:.0%} of train as the test split instead", file=sys.stderr)
            use_own_test = False
        else:
            for arrays in parts("test"):
                add("test", *arrays)
    if fraction is None and not use_own_test:
        fraction = carve_default
    rng = random.Random(seed) if fraction is not None else None  # one draw per document, as carve() draws
    for tokens, doc_tokens, doc_words, doc_bytes in parts("train"):
        if rng is None:
            add("train", tokens, doc_tokens, doc_words, doc_bytes)
            continue
        held = np.fromiter((rng.random() < fraction for _ in range(len(doc_tokens))), bool, len(doc_tokens))
        per_token = np.repeat(held, doc_tokens.astype(np.int64))
        add("train", tokens[~per_token], doc_tokens[~held], doc_words[~held], doc_bytes[~held])
        add("test", tokens[per_token], doc_tokens[held], doc_words[held], doc_bytes[held])
    for split in SPLITS:
        writer(split)
    for split, w in writers.items():
        stats[split].dropped_tokens = w.finish()
        stats[split].chunks = w.chunks
    return Merged(stats, fraction, sorted(encoders))


def stats_dict(stats: dict[str, SplitStats]) -> dict[str, Any]:
    return {name: asdict(stats[name]) for name in SPLITS}


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
