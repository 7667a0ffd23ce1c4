"""Evaluate a model: loss, perplexity, bits per byte (comparable across tokenizers) and tokens per word.

    gpt2-dutch evaluate --model-path trained_models/gpt2-dutch-small-latest --dataset-path processed_data/chunked_10k
    gpt2-dutch evaluate --model-path M --data-files held_out.jsonl.gz --json

--dataset-path scores the processed test split chunk by chunk (the model must share the dataset's tokenizer).
--data-files scores raw documents, tokenized with the model's own tokenizer: each document on its own,
preceded by <|endoftext|> (the boundary the model saw in training), in windows of the model's context that
overlap by half so every token after the first window still sees half a context of history.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import option
from .data import batched, expand_data_files, iter_local_texts, load_split, read_manifest
from .errors import check
from .generate import load_model


@dataclass
class EvaluateConfig:
    model_path: str = option("trained_models/gpt2-dutch-small-latest/final_model",
                             "a final_model directory, a run directory, or a *-latest link")
    dataset_path: str | None = option(None, "a processed dataset: its test split is scored")
    split: str = option("test", "which split of --dataset-path to score")
    data_files: list[str] = option([], "raw text files instead (.jsonl/.json/.parquet/.txt, optionally .gz)")
    text_column: str = option("text", "field/column holding the text in --data-files")
    sample_by: str = option("paragraph", "what a document is in .txt files",
                            choices=["paragraph", "line", "document"])
    batch_size: int = option(8, "sequences per forward pass")
    max_chunks: int | None = option(None, "score at most this many chunks of --dataset-path")
    device: str = option("auto", "cpu, cuda, cuda:N (auto: cuda if available)")
    dtype: str = option("fp32", "weights dtype for scoring", choices=["auto", "bf16", "fp16", "fp32"])
    json: bool = option(False, "print the result as JSON")

    def __post_init__(self) -> None:
        check(bool(self.dataset_path) != bool(self.data_files), "give exactly one of --dataset-path and --data-files")
        check(self.batch_size > 0, "--batch-size must be positive")
        check(self.max_chunks is None or self.max_chunks > 0, "--max-chunks must be positive")


@dataclass
class Totals:
    nats: float = 0.0
    tokens: int = 0


@torch.inference_mode()
def _score(model: Any, ids: torch.Tensor, labels: torch.Tensor, totals: Totals) -> None:
    """Add the summed cross-entropy of `labels` (-100 = not scored) given `ids` to `totals`."""
    ids, labels = ids.to(model.device), labels.to(model.device)
    # Sequences are right-padded and attention is causal, so padding never influences a scored position.
    logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction="sum")
    totals.nats += float(loss)
    totals.tokens += int((target != -100).sum())


def evaluate_dataset(model: Any, cfg: EvaluateConfig) -> dict[str, Any]:
    manifest = read_manifest(cfg.dataset_path)  # type: ignore[arg-type]
    check(manifest["vocab_size"] <= model.config.vocab_size and manifest["chunk_size"] <= model.config.n_positions,
          f"the model (vocab {model.config.vocab_size}, context {model.config.n_positions}) does not match "
          f"dataset {cfg.dataset_path} (vocab {manifest['vocab_size']}, chunks {manifest['chunk_size']}); "
          "evaluate raw text with --data-files instead")
    check(cfg.split in manifest["splits"], f"dataset has no '{cfg.split}' split")
    ds = load_split(cfg.dataset_path, cfg.split)  # type: ignore[arg-type]
    n = min(len(ds), cfg.max_chunks or len(ds))
    totals = Totals()
    for start in tqdm(range(0, n, cfg.batch_size), desc="evaluate", unit="batch"):
        ids = torch.from_numpy(np.asarray(ds[start:min(n, start + cfg.batch_size)]["input_ids"]).astype(np.int64))
        _score(model, ids, ids, totals)
    split = manifest["splits"][cfg.split]
    # bytes per token of the split as a whole: the scored chunks are a uniform slice of it
    bytes_scored = totals.tokens * split["bytes"] / split["tokens"]
    return _result(totals, bytes_scored, split["words"] / split["tokens"], split["documents"] if n == len(ds)
                   else None, source=str(cfg.dataset_path))


def _windows(ids: list[int], ctx: int) -> Iterator[tuple[list[int], int]]:
    """(window, first scored position) pairs covering every token of `ids` once, overlapping by half."""
    stride = max(1, ctx // 2)
    yield ids[:ctx], 1
    start = stride
    while start + ctx - stride < len(ids) and len(ids) > ctx:
        window = ids[start:start + ctx]
        yield window, ctx - stride  # the first ctx - stride tokens were already scored: context only
        start += stride


def evaluate_files(model: Any, tokenizer: Any, cfg: EvaluateConfig) -> dict[str, Any]:
    files = expand_data_files(cfg.data_files)
    ctx = model.config.n_positions
    eos = tokenizer.eos_token_id
    totals, n_docs, n_bytes, n_words = Totals(), 0, 0, 0
    pending: list[tuple[list[int], int]] = []

    def flush() -> None:
        width = max(len(w) for w, _ in pending)
        ids = torch.full((len(pending), width), eos, dtype=torch.long)
        labels = torch.full((len(pending), width), -100, dtype=torch.long)
        for i, (w, first) in enumerate(pending):
            ids[i, :len(w)] = torch.tensor(w)
            labels[i, first:len(w)] = torch.tensor(w[first:])
        _score(model, ids, labels, totals)
        pending.clear()

    with tqdm(desc="evaluate", unit="doc") as bar:
        for batch in batched(iter_local_texts(files, cfg.text_column, cfg.sample_by)):
            for text in batch:
                ids = [eos] + tokenizer(text, add_special_tokens=False)["input_ids"]
                for window in _windows(ids, ctx):
                    pending.append(window)
                    if len(pending) == cfg.batch_size:
                        flush()
                n_docs += 1
                n_bytes += len(text.encode("utf-8"))
                n_words += len(text.split())
                bar.update(1)
    if pending:
        flush()
    check(n_docs > 0, "no text found in --data-files")
    return _result(totals, n_bytes, n_words / totals.tokens, n_docs, source=", ".join(str(f) for f in files))


def _result(t: Totals, n_bytes: float, words_per_token: float, documents: int | None, source: str) -> dict:
    loss = t.nats / t.tokens
    return {"source": source, "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": t.nats / math.log(2) / n_bytes, "tokens_per_word": 1 / words_per_token,
            "documents": documents, "tokens_scored": t.tokens}


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    model, tokenizer, model_dir = load_model(cfg.model_path, cfg.device, cfg.dtype)
    result = evaluate_dataset(model, cfg) if cfg.dataset_path else evaluate_files(model, tokenizer, cfg)
    result["model"] = str(model_dir)
    if cfg.json:
        print(json.dumps(result, indent=2))
    else:
        rows = [("model", result["model"]), ("data", result["source"]), ("loss (nats/token)", f"{result['loss']:.4f}"),
                ("perplexity", f"{result['perplexity']:.2f}"), ("bits per byte", f"{result['bits_per_byte']:.4f}"),
                ("tokens per word", f"{result['tokens_per_word']:.3f}"),
                ("documents", "-" if result["documents"] is None else f"{result['documents']:,}"),
                ("tokens scored", f"{result['tokens_scored']:,}")]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return result

