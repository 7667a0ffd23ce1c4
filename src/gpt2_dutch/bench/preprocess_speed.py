"""Preprocessing: gpt2-dutch preprocess vs run_clm.py's data path, and the bare speed of each side's encoder.

    gpt2-dutch bench preprocess            # ~1-2 min on 2 cores; every figure below
    gpt2-dutch bench preprocess --quick    # the built-in sample, once each

Two kinds of figures. In-process (`ours`, `recipe`): libraries imported before the clock starts, as before. Whole
process (`whole`): the command as a user runs it, start-up included, with 1 and with 2 workers, against the
recipe's whole run; each also gives its steady state, the text over the seconds from its first part started to its
last one finished (the manifest's encode_seconds), and the scaling efficiency of 2 workers over 1 for both. On a
machine (or a `taskset`) with one core the 2-worker figures only show the cost of sharing it.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpt2_dutch.bench.report import say
from gpt2_dutch.data.chunks import read_manifest


def train_bench_tokenizer(text: Path, out: Path, vocab_size: int) -> str:
    from gpt2_dutch.data.sources import iter_local_texts
    from gpt2_dutch.data.tokenizer import train_bpe

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


RECIPE_WHOLE = ("import sys; from gpt2_dutch.bench.baselines import preprocess_recipe; "
                "preprocess_recipe(*sys.argv[1:5], int(sys.argv[5]))")


def _whole(command: list[str]) -> dict[str, Any]:
    """COMMAND's wall time, start-up included, and its largest process's peak memory (preprocess_child whole)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    r = subprocess.run([sys.executable, "-m", "gpt2_dutch.bench.preprocess_child", "whole", *command],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"bench preprocess (whole process) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _ours_whole(text: Path, tokenizer: str, out: Path, chunk: int, workers: int) -> dict[str, Any]:
    result = _whole([sys.executable, "-m", "gpt2_dutch", "preprocess", "--data-files", str(text), "--tokenizer",
                     tokenizer, "--output-dir", str(out), "--name", "d", "--chunk-size", str(chunk),
                     "--num-workers", str(workers)])
    manifest = read_manifest(out / "d")
    result["text_mb"] = sum(s["bytes"] for s in manifest["splits"].values()) / 1e6
    result["encode_seconds"] = manifest["encode_seconds"]
    result["parts"] = manifest["parts"]["train"] + manifest["parts"]["test"]
    shutil.rmtree(out)
    return result


def recipe_tokenizer(tokenizer: str, tmp: Path) -> str:
    """The tokenizer as a directory AutoTokenizer opens (the recipe's loader cannot convert bare vocab.json +
    merges.txt without sentencepiece): saved once, before any timing."""
    path = Path(tokenizer)
    if not path.is_dir() or (path / "tokenizer.json").is_file():
        return tokenizer
    from gpt2_dutch.data.tokenizer import load_tokenizer

    out = tmp / "recipe-tokenizer"
    if not out.is_dir():
        load_tokenizer(tokenizer).save_pretrained(str(out))
    return str(out)


def bench_whole(text: Path, tokenizer: str, tmp: Path, quick: bool) -> dict[str, Any]:
    """Whole processes, start-up included: ours with 1 and 2 workers, and the recipe; fastest of the repeats."""
    from gpt2_dutch.preprocess import available_cores

    chunk = 128 if quick else 1024
    recipe_tok = recipe_tokenizer(tokenizer, tmp)
    runs: dict[str, list[dict[str, Any]]] = {"ours_1": [], "ours_2": [], "recipe": []}
    for i in range(1 if quick else 3):  # alternated, so a busy moment of a shared machine hits every side
        runs["ours_1"].append(_ours_whole(text, tokenizer, tmp / f"whole-1-{i}", chunk, 1))
        runs["ours_2"].append(_ours_whole(text, tokenizer, tmp / f"whole-2-{i}", chunk, 2))
        out = tmp / f"whole-recipe-{i}"
        runs["recipe"].append(_whole([sys.executable, "-c", RECIPE_WHOLE, str(text), recipe_tok, str(out),
                                      str(out) + ".cache", str(chunk)]))
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(str(out) + ".cache", ignore_errors=True)
    one, two, recipe = (min(runs[s], key=lambda r: r["seconds"]) for s in runs)
    steady_1, steady_2 = (min(r["encode_seconds"] for r in runs[s]) for s in ("ours_1", "ours_2"))
    mb = one["text_mb"]
    cores = available_cores()
    default = two if cores >= 2 else one  # what `gpt2-dutch preprocess` runs here by default (up to 2 workers)
    return {
        "cores": cores, "parts": one["parts"], "text_mb": mb,
        "ours_1_mb_per_s": mb / one["seconds"], "ours_2_mb_per_s": mb / two["seconds"],
        "recipe_mb_per_s": mb / recipe["seconds"], "speedup": recipe["seconds"] / default["seconds"],
        "scaling_efficiency": one["seconds"] / two["seconds"] / 2,
        "steady_1_mb_per_s": mb / steady_1, "steady_2_mb_per_s": mb / steady_2,
        "steady_scaling_efficiency": steady_1 / steady_2 / 2,
        "ours_2_peak_rss_mb": two["peak_rss_mb"], "recipe_peak_rss_mb": recipe["peak_rss_mb"],
    }


def bench_preprocess(text: Path, mb: float, tokenizer: str, tmp: Path, quick: bool) -> dict[str, Any]:
    chunk = 128 if quick else 1024
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "recipe": [], "encoder": [], "tokenizers": []}
    for i in range(1 if quick else 2):  # alternate the sides; keep each side's fastest run
        for side in runs:
            tok = recipe_tokenizer(tokenizer, tmp) if side in ("recipe", "tokenizers") else tokenizer
            runs[side].append(_run_child(side, text, tok, tmp / f"pre-{side}-{i}", chunk))
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
    result["whole"] = bench_whole(text, tokenizer, tmp, quick)
    if not quick:  # memory stays flat: the same text 10 times over (gzip members concatenate), 2 workers, whole
        ten = tmp / "ten.jsonl.gz"
        raw = text.read_bytes()
        ten.write_bytes(raw * 10 if text.suffix == ".gz" else gzip.compress(raw) * 10)
        ours10 = _ours_whole(ten, tokenizer, tmp / "pre-ours-10x", chunk, 2)
        result.update(ours_10x_mb_per_s=10 * mb / ours10["seconds"], ours_10x_peak_rss_mb=ours10["peak_rss_mb"])
    return result
