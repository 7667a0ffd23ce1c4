"""Preprocessing: gpt2-dutch preprocess vs run_clm.py's data path, and the bare speed of each side's encoder."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .report import say


def train_bench_tokenizer(text: Path, out: Path, vocab_size: int) -> str:
    from ..data import iter_local_texts
    from ..tokenizer import train_bpe

    say(f"training a {vocab_size}-token Dutch BPE on {text.name} for the benchmark (not timed)")
    train_bpe(iter_local_texts([text], "text", "paragraph"), vocab_size).save_pretrained(str(out))
    return str(out)


def _run_child(side: str, text: Path, tokenizer: str, out: Path, chunk: int) -> dict[str, Any]:
    """One side in a fresh process (its peak memory is its own), libraries imported before its clock starts."""
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "true"}
    r = subprocess.run([sys.executable, "-m", "gpt2_dutch.bench.preprocess_child", side, str(text), tokenizer,
                        str(out), str(out) + ".cache", str(chunk)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"bench preprocess ({side}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_preprocess(text: Path, mb: float, tokenizer: str, tmp: Path, quick: bool) -> dict[str, Any]:
    chunk = 128 if quick else 1024
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "recipe": [], "encoder": [], "tokenizers": []}
    for i in range(1 if quick else 2):  # alternate the sides; keep each side's fastest run
        for side in runs:
            runs[side].append(_run_child(side, text, tokenizer, tmp / f"pre-{side}-{i}", chunk))
    ours, recipe, encoder, tokenizers = (min(runs[s], key=lambda r: r["seconds"]) for s in runs)
    result: dict[str, Any] = {
        "text_mb": mb, "chunk_size": chunk,
        "ours_mb_per_s": mb / ours["seconds"], "recipe_mb_per_s": mb / recipe["seconds"],
        "speedup": recipe["seconds"] / ours["seconds"],
        # The bounds: tokenizing is most of the work, so neither side beats the bare speed of its encoder
        # (ours: tiktoken for a GPT-2-style BPE; the recipe: tokenizers).
        "encoder": encoder["encoder"], "encoder_mb_per_s": mb / encoder["seconds"],
        "ours_fraction_of_encoder": encoder["seconds"] / ours["seconds"],
        "recipe_encoder_mb_per_s": mb / tokenizers["seconds"],
        "recipe_fraction_of_encoder": tokenizers["seconds"] / recipe["seconds"],
        "ours_bytes_per_token": ours["bytes_on_disk"] / ours["tokens"],
        "recipe_bytes_per_token": recipe["bytes_on_disk"] / recipe["tokens"],
        "ours_peak_rss_mb": ours["peak_rss_mb"], "recipe_peak_rss_mb": recipe["peak_rss_mb"],
    }
    if not quick:  # streaming memory stays flat: the same text 10 times over (gzip members concatenate)
        ten = tmp / "ten.jsonl.gz"
        raw = text.read_bytes()
        ten.write_bytes(raw * 10 if text.suffix == ".gz" else gzip.compress(raw) * 10)
        ours10 = _run_child("ours", ten, tokenizer, tmp / "pre-ours-10x", chunk)
        result.update(ours_10x_mb_per_s=10 * mb / ours10["seconds"], ours_10x_peak_rss_mb=ours10["peak_rss_mb"])
    return result
