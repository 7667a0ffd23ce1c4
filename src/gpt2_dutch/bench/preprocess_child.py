"""One timed preprocessing run in a process of its own, for `gpt2-dutch bench` (preprocess_speed.py starts it).

    python -m gpt2_dutch.bench.preprocess_child SIDE TEXT TOKENIZER OUT CACHE CHUNK
    python -m gpt2_dutch.bench.preprocess_child whole COMMAND...

SIDE: `ours` (gpt2-dutch preprocess, streamed), `recipe` (run_clm.py's data path), or the bounds on texts already
in memory: `encoder` (our batch encoder, tiktoken where it applies) and `tokenizers` (the recipe's encoder).
Prints one JSON line: seconds, peak_rss_mb, tokens, bytes_on_disk (and encoder for the bounds).
A fresh process per run makes each side's peak memory its own.
`whole` runs COMMAND as a process of its own and prints its wall time, start-up included, and the peak memory
of its largest process (preprocess's workers included: they are its descendants).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any


def whole(command: list[str]) -> dict[str, Any]:
    import subprocess

    t0 = time.perf_counter()
    r = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{r.stderr[-3000:]}")
    # ru_maxrss of the children: the largest of every descendant waited for (KB on Linux)
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run(side: str, text: str, tok: str, out: str, cache: str, chunk: int) -> dict[str, Any]:
    # Every library either side uses is imported here, before the clock starts: import time is not preprocessing.
    import datasets  # noqa: F401
    import tokenizers  # noqa: F401
    import transformers  # noqa: F401

    from gpt2_dutch.bench.baselines import preprocess_recipe
    from gpt2_dutch.data.chunks import read_manifest
    from gpt2_dutch.data.sources import iter_local_texts
    from gpt2_dutch.data.tokenizer import BatchEncoder, load_tokenizer
    from gpt2_dutch.preprocess import PreprocessConfig, preprocess

    if side in ("encoder", "tokenizers"):  # the limits: bare batch encoders on texts already in memory
        texts = list(iter_local_texts([Path(text)], "text", "paragraph"))
        encoder = BatchEncoder(load_tokenizer(tok), os.cpu_count(), "auto" if side == "encoder" else "tokenizers")
        encoder(texts[:64])  # the one-time check against tokenizers happens here, not on the clock
    t0 = time.perf_counter()
    if side == "recipe":
        stored = preprocess_recipe(text, tok, out, cache, chunk)
    elif side in ("encoder", "tokenizers"):
        stored = {"tokens": sum(len(ids) for i in range(0, len(texts), 1000) for ids in encoder(texts[i:i + 1000])),
                  "encoder": encoder.name}
    else:
        path = preprocess(PreprocessConfig(data_files=[text], tokenizer=tok, output_dir=out, name="d",
                                           chunk_size=chunk, streaming=True))
        splits = read_manifest(path)["splits"]
        stored = {"tokens": sum(s["chunks"] for s in splits.values()) * chunk}
    seconds = time.perf_counter() - t0
    stored["bytes_on_disk"] = sum(f.stat().st_size for f in Path(out).rglob("*.arrow"))
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), **stored}


def peak_rss_mb() -> float:
    # VmHWM is this process's own peak; ru_maxrss would also count the parent's memory copied at fork.
    if sys.platform == "linux":
        with open("/proc/self/status") as f:
            hwm = [line for line in f if line.startswith("VmHWM:")]
        if hwm:
            return int(hwm[0].split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    if sys.argv[1] == "whole":
        print(json.dumps(whole(sys.argv[2:])))
    else:
        side, text, tok, out, cache, chunk = sys.argv[1:7]
        print(json.dumps(run(side, text, tok, out, cache, int(chunk))))
