"""Evaluate a model: loss, perplexity, bits per byte (comparable across tokenizers) and tokens per word.

    gpt2-dutch evaluate --model-path trained_models/gpt2-dutch-small-latest --dataset-path processed_data/chunked_10k
    gpt2-dutch evaluate --model-path M --data-files held_out.jsonl.gz --json

--dataset-path scores the processed test split chunk by chunk. The model must share the dataset's tokenizer:
the dataset's ids mean nothing to a model that was trained with other ones, so a dataset whose tokenizer differs
(vocabulary, merges, normalizer, pre-tokenizer, end-of-text token) is refused, with what differs.
--data-files scores raw documents, tokenized with the model's own tokenizer: each document on its own,
preceded by <|endoftext|> (the boundary the model saw in training), in windows of the model's context that
overlap by half so every token after the first window still sees half a context of history.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2_dutch.core.errors import BAR_DELAY_S, UsageError, check
from gpt2_dutch.core.options import option
from gpt2_dutch.data.chunks import load_split, read_manifest
from gpt2_dutch.data.sources import batched, expand_data_files, iter_local_texts

if TYPE_CHECKING:  # torch is imported where it is used: building the CLI's parser imports this module
    import torch


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
    eval_chunks: int | None = option(None, "score at most this many chunks of --dataset-path (0: all)",
                                     aliases=["--max-chunks"])
    device: str = option("auto", "cpu, cuda, cuda:N (auto: cuda if available)")
    # fp32, not generate's auto: a score must not depend on the machine (auto picks bf16 by hardware, and its
    # rounding moves perplexity), so runs scored on different machines compare
    precision: str = option("fp32", "weights dtype for scoring; fp32 so that scores compare across machines (auto: "
                            "bf16 on GPUs and CPUs with fast bf16, else fp32)",
                            choices=["auto", "bf16", "fp16", "fp32"], aliases=["--dtype"])
    json: bool = option(False, "print the result as JSON")

    def __post_init__(self) -> None:
        check(bool(self.dataset_path) != bool(self.data_files), "give exactly one of --dataset-path and --data-files")
        # No upper bounds: a batch never holds more than the data has, and running out of memory is one line.
        check(self.batch_size > 0, f"--batch-size must be positive (got {self.batch_size})")
        # 0 is the whole split, as in train's --eval-chunks
        check(self.eval_chunks is None or self.eval_chunks >= 0, f"--eval-chunks must be >= 0 (got {self.eval_chunks})")


@dataclass
class Totals:
    nats: float = 0.0
    tokens: int = 0


def _score(model: Any, ids: torch.Tensor, labels: torch.Tensor, totals: Totals) -> None:
    """Add the summed cross-entropy of `labels` (-100 = not scored) given `ids` to `totals`."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        ids, labels = ids.to(model.device), labels.to(model.device)
        # Sequences are right-padded and attention is causal, so padding never influences a scored position.
        try:
            logits = model(input_ids=ids).logits[:, :-1].float()
        except torch.OutOfMemoryError:
            raise _out_of_memory(ids) from None
        except RuntimeError as e:
            if "can't allocate memory" not in str(e) and "not enough memory" not in str(e):  # CPU allocators
                raise
            raise _out_of_memory(ids) from None
        target = labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                               reduction="sum")
        totals.nats += float(loss)
        totals.tokens += int((target != -100).sum())


def _out_of_memory(ids: torch.Tensor) -> UsageError:
    return UsageError(f"out of memory scoring a batch of {ids.shape[0]} sequences of {ids.shape[1]} tokens on "
                      f"{ids.device}; use a smaller --batch-size")


def tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """What decides the ids a tokenizer produces, and the end-of-text id that separates documents.

    Not compared: truncation and padding (preprocess and evaluate turn them off), model_max_length, the decoder
    and the pad token (load_model sets it to the end-of-text token).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}  # a slow tokenizer: vocabulary only
    model = spec.get("model") or {}
    return {"vocabulary": tokenizer.get_vocab(), "merges": model.get("merges"),
            "model": {k: v for k, v in model.items() if k not in ("vocab", "merges")},
            "normalizer": spec.get("normalizer"), "pre-tokenizer": spec.get("pre_tokenizer"),
            "added tokens": {t["content"]: (t["id"], t.get("special")) for t in spec.get("added_tokens", [])},
            "eos": (tokenizer.eos_token, tokenizer.eos_token_id)}


def tokenizer_difference(dataset: dict[str, Any], model: dict[str, Any]) -> str | None:
    """What differs between two tokenizer_spec()s, as 'dataset ..., model ...', or None if nothing does."""
    a, b = dataset["vocabulary"], model["vocabulary"]
    if a != b:
        if len(a) != len(b):
            return f"dataset vocabulary of {len(a):,} tokens, model {len(b):,}"
        n = sum(b.get(token) != i for token, i in a.items())
        return f"{n:,} of the {len(a):,} vocabulary entries have other ids or are missing"
    a, b = dataset["merges"] or [], model["merges"] or []
    if a != b:
        n = sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))
        return f"{n:,} of the BPE merges differ (dataset {len(a):,} merges, model {len(b):,})"
    for key in ("model", "normalizer", "pre-tokenizer", "added tokens"):
        if dataset[key] != model[key]:
            return f"the {key} settings differ (dataset {_brief(dataset[key])}, model {_brief(model[key])})"
    if dataset["eos"] != model["eos"]:
        (a_tok, a_id), (b_tok, b_id) = dataset["eos"], model["eos"]
        return f"end-of-text token: dataset {a_tok!r} (id {a_id}), model {b_tok!r} (id {b_id})"
    return None


def _brief(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def check_dataset_tokenizer(dataset_path: str, manifest: dict[str, Any], tokenizer: Any, model_dir: Any) -> None:
    """Refuse a dataset made with another tokenizer than the model's: its scores would be meaningless."""
    from gpt2_dutch.data.tokenizer import BadTokenizer, load_tokenizer_dir

    fix = "evaluate raw text with --data-files (tokenized with the model's own tokenizer), or use the dataset the " \
          "model was trained on"
    files = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    if not any((Path(dataset_path) / f).is_file() for f in files):
        raise UsageError(f"dataset {dataset_path} holds no tokenizer ({', '.join(files)}), so it cannot be checked "
                         f"against the model's; preprocess the data again, or {fix}")
    try:
        theirs = load_tokenizer_dir(dataset_path)
    except BadTokenizer as e:
        raise UsageError(f"dataset {dataset_path} has no readable tokenizer ({e.cause}), so it cannot be checked "
                         f"against the model's; preprocess the data again, or {fix}") from None
    difference = tokenizer_difference(tokenizer_spec(theirs), tokenizer_spec(tokenizer))
    info = manifest.get("tokenizer")
    recorded = info.get("eos_token_id") if isinstance(info, dict) else None
    if difference is None and recorded is not None and recorded != tokenizer.eos_token_id:
        difference = f"the dataset's manifest says its end-of-text id is {recorded}, the model's is " \
                     f"{tokenizer.eos_token_id}"
    if difference is not None:
        raise UsageError(f"dataset {dataset_path} was made with a different tokenizer than model {model_dir} "
                         f"({difference}): its token ids mean other tokens to this model and its scores would "
                         f"be meaningless; {fix}")


def evaluate_dataset(model: Any, cfg: EvaluateConfig, tokenizer: Any = None, model_dir: Any = None) -> dict[str, Any]:
    """Score the chunks of a processed dataset; with `tokenizer`, first check it is the dataset's."""
    import torch
    from tqdm.auto import tqdm

    from gpt2_dutch.model.loading import context_length

    manifest = read_manifest(cfg.dataset_path)  # type: ignore[arg-type]
    if tokenizer is not None:
        check_dataset_tokenizer(cfg.dataset_path, manifest, tokenizer, model_dir)  # type: ignore[arg-type]
    context = context_length(model) or manifest["chunk_size"]
    check(manifest["vocab_size"] <= model.config.vocab_size and manifest["chunk_size"] <= context,
          f"the model (vocab {model.config.vocab_size}, context {context}) does not match "
          f"dataset {cfg.dataset_path} (vocab {manifest['vocab_size']}, chunks {manifest['chunk_size']}); "
          "evaluate raw text with --data-files instead")
    check(cfg.split in manifest["splits"], f"dataset has no '{cfg.split}' split")
    ds = load_split(cfg.dataset_path, cfg.split)  # type: ignore[arg-type]
    where = f"{Path(cfg.dataset_path) / cfg.split}"  # type: ignore[arg-type]
    check("input_ids" in ds.column_names, f"{where} has no input_ids column; preprocess the data again")
    n = min(len(ds), cfg.eval_chunks or len(ds))
    totals = Totals()
    for start in tqdm(range(0, n, cfg.batch_size), desc="evaluate", unit="batch", delay=BAR_DELAY_S):
        rows = _chunk_rows(ds[start:min(n, start + cfg.batch_size)]["input_ids"], model.config.vocab_size, context,
                           f"{where} (chunks {start}-{min(n, start + cfg.batch_size) - 1})")
        ids = torch.from_numpy(rows)
        _score(model, ids, ids, totals)
    split = manifest["splits"][cfg.split]
    # bytes per token of the split as a whole: the scored chunks are a uniform slice of it
    bytes_scored = totals.tokens * split["bytes"] / split["tokens"]
    return _result(totals, bytes_scored, split["words"] / split["tokens"], split["documents"] if n == len(ds)
                   else None, source=str(cfg.dataset_path))


def _chunk_rows(rows: Any, vocab: int, context: int, where: str) -> Any:
    """A batch of chunks as an int64 [rows, tokens] array, checked against the model: token ids it has no embedding
    for would fail inside the forward pass (on a GPU as a device-side assert)."""
    import numpy as np

    try:
        batch = np.asarray(rows)
    except ValueError:  # rows of different lengths
        batch = np.asarray([], dtype=object)
    if batch.ndim != 2 or not np.issubdtype(batch.dtype, np.integer) or not 0 < batch.shape[1] <= context:
        raise UsageError(f"{where}: the chunks are not rows of at most {context} token ids; preprocess the data "
                         "again")
    low, high = int(batch.min()), int(batch.max())
    if low < 0 or high >= vocab:
        raise UsageError(f"{where} holds token id {low if low < 0 else high}, outside the model's vocabulary of "
                         f"{vocab:,}; the dataset was made for another model (score raw text with --data-files)")
    return batch.astype(np.int64)


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
    import torch
    from tqdm.auto import tqdm

    from gpt2_dutch.model.loading import context_length

    files = expand_data_files(cfg.data_files)
    ctx = context_length(model) or 1024
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

    with tqdm(desc="evaluate", unit="doc", delay=BAR_DELAY_S) as bar:
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
    from gpt2_dutch.model.loading import load_model

    model, tokenizer, model_dir = load_model(cfg.model_path, cfg.device, cfg.precision)
    result = evaluate_dataset(model, cfg, tokenizer, model_dir) if cfg.dataset_path else \
        evaluate_files(model, tokenizer, cfg)
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

