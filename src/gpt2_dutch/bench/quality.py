"""Quality per compute: held-out bits per byte of `gpt2-dutch train` against a textbook Trainer run, each given
the same time budget on the same text and tokenizer.

    gpt2-dutch bench quality                                 # 4 minutes of training per side, seed 42
    gpt2-dutch bench quality --seeds 2                       # seeds 42 and 43: per-seed figures and means
    gpt2-dutch bench quality --max-time 90s --ours-config ablation.yaml   # ours with other TrainConfig settings
    gpt2-dutch bench quality --quick                         # a 3-second budget on the built-in sample (CI)
    gpt2-dutch bench quality --seeds 2 --ablation defaults --ablation wsd.yaml   # more variants of ours beside it
    gpt2-dutch bench quality --budgets 2m,4m,12m             # the same at each budget (seeds 42, 43), one plot

What happens, in order:
1. Whole documents are held out before anything else (5% of them, at least 3; seeded, the same for every seed
   and every --ours-config), and any training document with the same text as a held-out one is dropped.
2. Tokenizer: --tokenizer, else a Dutch BPE (32,768 tokens) trained on the training documents only.
3. Ours: `gpt2-dutch preprocess` with its defaults (1024-token chunks; it carves 10% of the documents it gets
   as its own test split), then `gpt2-dutch train --model-size auto --max-time BUDGET --seed S`, plus the
   TrainConfig settings of --ours-config (a JSON/YAML file of train's flags, as `train --config` reads them).
4. Baseline (baselines.py, TEXTBOOK): the same training documents ours trained on, run_clm's data path, a
   4x256 GPT-2 (context 256, batch 8), AdamW 1e-3, 5% warmup then cosine to 0, fp32; max_steps set from a
   timing run (a tenth of the budget) so that its steps fill the same budget.
5. Both final models score the held-out documents with `gpt2-dutch evaluate` (fp32, each document after an
   <|endoftext|>), and the report gives both bits per byte and ours / baseline (lower is better).

The budget is for training steps on both sides: our --max-time fits its step count from the speed of its first
steps and refits it while its rate is at the peak, and its evaluations along the way come on top; the baseline
evaluates and saves nothing while training.
Each side's seconds of training, steps, tokens and parameters are recorded, so the report shows the budgets
matched. Steps 1-3's data (prepare) also serve --budgets (once for every budget) and --shape
(sample_efficiency.py, without the textbook's data).
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

from gpt2_dutch.bench.report import say
from gpt2_dutch.core.errors import check
from gpt2_dutch.data.chunks import read_manifest
from gpt2_dutch.runs.records import metric_kind, read_metrics, read_run_config

HELDOUT_FRACTION, HELDOUT_MIN = 0.05, 3
CARVE_SEED = 0  # the held-out documents do not change with the training seeds: every seed scores the same text
FIRST_SEED = 42  # train's default seed: seed 1 is what a user's run gets
# What the bench decides for ours (the data, the budget, the seed, where runs go): not --ours-config's to change.
SET_BY_BENCH = ("dataset_path", "output_dir", "seed", "max_time", "max_steps", "max_tokens", "resume", "init_from")
# Our settings as the report shows them (read from the run's run_config.json, so they are the resolved values).
SHOWN_SETTINGS = ("model_size", "optimizer", "schedule", "batch_size", "gradient_accumulation_steps", "context",
                  "learning_rate", "warmup", "cooldown", "weight_decay", "precision", "tie_embeddings", "compile",
                  "tokens_per_step")


def ours_overrides(path: str, flag: str = "--ours-config") -> dict[str, Any]:
    """The TrainConfig settings in an --ours-config file, checked as `train --config` checks them (unknown keys,
    types, values), before any work starts."""
    from gpt2_dutch.core.options import config_values, read_config_file
    from gpt2_dutch.train.config import TrainConfig

    where = f"{flag} {path}"
    check(Path(path).is_file(), f"{where} not found (a JSON or YAML file of train settings, e.g. learning_rate: 3e-3)")
    values = config_values(TrainConfig, read_config_file(path, where), where)
    fixed = [k for k in values if k in SET_BY_BENCH]
    check(not fixed, f"{where}: {', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} set by the bench (the same "
          "data, budget and seeds for both sides: use --max-time and --seeds); remove it from the file")
    TrainConfig(**{**values, "dataset_path": "-"})  # its own checks: a value out of range is one line now
    return values


def split_documents(docs: list[str], seed: int = CARVE_SEED) -> tuple[list[str], list[str], list[int], int]:
    """(train, held out, held-out indices, training documents dropped as copies of held-out ones).

    Whole documents, drawn with a seeded RNG; a training document with the text of a held-out one is dropped, so
    no held-out text is ever trained on, even in a corpus with duplicates."""
    n = len(docs)
    k = max(HELDOUT_MIN, round(HELDOUT_FRACTION * n))
    check(n >= 2 * k + 2, f"bench quality needs at least {2 * HELDOUT_MIN + 2} documents to hold {HELDOUT_MIN} out "
          f"(the text has {n}); give a larger --data-files")
    indices = sorted(random.Random(seed).sample(range(n), k))
    chosen = set(indices)
    heldout = [docs[i] for i in indices]
    texts = set(heldout)
    others = [d for i, d in enumerate(docs) if i not in chosen]
    train = [d for d in others if d not in texts]
    return train, heldout, indices, len(others) - len(train)


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def _nbytes(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


def ablation_variants(paths: list[str]) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(name, file, checked overrides) for each --ablation entry; 'defaults' is ours with nothing changed."""
    return [("defaults", None, {}) if p == "defaults" else (Path(p).stem, p, ours_overrides(p, "--ablation"))
            for p in paths]


def prepare(text: Path, tokenizer: str | None, tmp: Path, quick: bool, chunk_size: int | None = None,
            textbook: bool = True) -> dict[str, Any]:
    """Steps 1-4's data: the held-out documents, the tokenizer, our dataset, the textbook's (if `textbook`), and
    what the report says about them."""
    from gpt2_dutch.bench.preprocess_speed import train_bench_tokenizer
    from gpt2_dutch.data.sources import iter_local_texts
    from gpt2_dutch.preprocess import DEFAULT_CARVE_FRACTION, PreprocessConfig, carve, preprocess

    docs = list(iter_local_texts([text], "text", "paragraph"))  # the documents exactly as preprocess reads them
    train_docs, heldout, indices, dropped = split_documents(docs)
    root = tmp / "quality"
    root.mkdir()
    train_file, heldout_file = _write_jsonl(root / "train.jsonl", train_docs), _write_jsonl(root / "heldout.jsonl",
                                                                                             heldout)
    say(f"quality: {len(heldout)} of {len(docs)} documents held out")
    trained = tokenizer is None
    if tokenizer is None:
        tokenizer = train_bench_tokenizer(train_file, root / "tokenizer", 4096 if quick else 32768)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the report's table
        dataset = preprocess(PreprocessConfig(data_files=[str(train_file)], tokenizer=tokenizer,
                                              output_dir=str(root), name="ours-data",
                                              **({"chunk_size": chunk_size} if chunk_size else {})))
    # The baseline trains on exactly the documents ours trains on: preprocess's own carve of its test split
    # (seeded, per document) decides which those are; the manifest's counts confirm it.
    defaults = PreprocessConfig(data_files=[str(train_file)])
    ours_train = list(carve(iter(train_docs), DEFAULT_CARVE_FRACTION, defaults.seed, want_test=False))
    split = read_manifest(dataset)["splits"]["train"]
    if (split["documents"], split["bytes"]) != (len(ours_train), _nbytes(ours_train)):
        raise RuntimeError(f"bench quality: the training split of {dataset} ({split['documents']} documents) is not "
                           f"the {len(ours_train)} documents the baseline would get; preprocess's carve changed")
    baseline_data = None
    if textbook:
        from gpt2_dutch.bench.baselines import textbook_dataset

        baseline_file = _write_jsonl(root / "baseline-train.jsonl", ours_train)
        with contextlib.redirect_stdout(sys.stderr):
            baseline_data = textbook_dataset(str(baseline_file), tokenizer, str(root / "hf-cache"))
    return {"root": root, "dataset": dataset, "heldout_file": heldout_file, "tokenizer": tokenizer,
            "baseline_data": baseline_data, "report": {
                "heldout": {"documents": len(heldout), "bytes": _nbytes(heldout), "indices": indices,
                            "fraction": HELDOUT_FRACTION, "carve_seed": CARVE_SEED},
                "train_text": {"documents": len(ours_train), "bytes": _nbytes(ours_train),
                               "dropped_as_copies_of_heldout": dropped,
                               "ours_test_split_documents": len(train_docs) - len(ours_train)},
                "tokenizer": "Dutch BPE trained on the training documents" if trained else tokenizer}}


def bench_quality(text: Path, tokenizer: str | None, tmp: Path, quick: bool, budget_s: float, seeds: int,
                  ours_config: str | None, overrides: dict[str, Any],
                  ablation: list[tuple[str, str | None, dict[str, Any]]] | None = None) -> dict[str, Any]:
    data = prepare(text, tokenizer, tmp, quick)
    return budget_runs(data, budget_s, seeds, ours_config, overrides, ablation)


def bench_quality_budgets(text: Path, tokenizer: str | None, tmp: Path, quick: bool, budgets: list[str],
                          seeds: int, ours_config: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """`bench quality --budgets 2m,4m,12m`: the one-budget comparison at each budget, on the same data."""
    from gpt2_dutch.core.options import parse_duration

    data = prepare(text, tokenizer, tmp, quick)
    runs = []
    for name in budgets:
        say(f"quality: the {name} budget")
        runs.append(budget_runs(data, parse_duration(name, "--budgets"), seeds, ours_config, overrides,
                                None, tag=name))
    return {"budget_names": budgets, "budgets": runs, "ratios": [q["ratio"] for q in runs]}


def budget_runs(data: dict[str, Any], budget_s: float, seeds: int, ours_config: str | None,
                overrides: dict[str, Any], ablation: list[tuple[str, str | None, dict[str, Any]]] | None = None,
                tag: str = "") -> dict[str, Any]:
    """Ours and the textbook for `budget_s` seconds each, per seed, scored on the held-out documents."""
    from gpt2_dutch.bench.baselines import TEXTBOOK

    root, dataset, heldout_file = data["root"], data["dataset"], data["heldout_file"]
    say(f"quality: each side trains for {budget_s:g} s")
    runs = []
    for i in range(seeds):
        seed = FIRST_SEED + i
        sides = ["ours", "baseline"] if i % 2 == 0 else ["baseline", "ours"]  # alternate: drift hits both alike
        run: dict[str, Any] = {"seed": seed}
        for side in sides:
            if side == "ours":
                say(f"quality, seed {seed}: gpt2-dutch train{' (' + ours_config + ')' if ours_config else ''}")
                run["ours"] = _ours(dataset, budget_s, seed, overrides, root / f"ours{tag}-{seed}")
            else:
                say(f"quality, seed {seed}: the textbook Trainer recipe (baseline)")
                run["baseline"] = _baseline(data["baseline_data"], data["tokenizer"], budget_s, seed,
                                            root / f"baseline{tag}-{seed}")
            run[side].update(_score(run[side].pop("model"), heldout_file))  # the model goes with tmp
            _free_memory()
        run["ratio"] = run["ours"]["bits_per_byte"] / run["baseline"]["bits_per_byte"]
        # the ablation's variants train on the same data with the same seed; the baseline run above serves all
        run["ablation"] = []
        for name, _file, changes in ablation or []:
            say(f"quality, seed {seed}: ablation '{name}'")
            v = _ours(dataset, budget_s, seed, changes, root / f"ablation-{name}-{seed}")
            v.update(_score(v.pop("model"), heldout_file))
            v["ratio"] = v["bits_per_byte"] / run["baseline"]["bits_per_byte"]
            run["ablation"].append(v)
            _free_memory()
        runs.append(run)
    ours_bpb = statistics.fmean(r["ours"]["bits_per_byte"] for r in runs)
    base_bpb = statistics.fmean(r["baseline"]["bits_per_byte"] for r in runs)
    info = runs[0]["ours"].pop("settings")
    for r in runs[1:]:
        r["ours"].pop("settings")
    variants = _ablation_summary(runs, ablation or [], base_bpb)
    return {
        "budget_s": budget_s, "seeds": [r["seed"] for r in runs], **data["report"],
        "ours": {"name": Path(ours_config).stem if ours_config else "gpt2-dutch defaults", "config_file": ours_config,
                 "overrides": overrides, "settings": info},
        "baseline": {"name": "textbook Trainer", "settings": TEXTBOOK},
        "runs": runs,
        "ours_bits_per_byte": ours_bpb, "baseline_bits_per_byte": base_bpb, "ratio": ours_bpb / base_bpb,
        **({"ablation": variants} if variants else {}),
    }


def _ablation_summary(runs: list[dict[str, Any]], ablation: list[tuple[str, str | None, dict[str, Any]]],
                      base_bpb: float) -> list[dict[str, Any]]:
    variants = []
    for i, (name, file, changes) in enumerate(ablation):
        per_seed = [r["ablation"][i] for r in runs]
        settings = per_seed[0]["settings"]
        for v in per_seed:
            v.pop("settings")
        bpb = statistics.fmean(v["bits_per_byte"] for v in per_seed)
        variants.append({"name": name, "config_file": file, "overrides": changes, "settings": settings,
                         "bits_per_byte": [v["bits_per_byte"] for v in per_seed], "mean_bits_per_byte": bpb,
                         "ratio": bpb / base_bpb})
    for r in runs:
        r.pop("ablation")
    return variants


def _ours(dataset: Path, budget_s: float, seed: int, overrides: dict[str, Any], out: Path) -> dict[str, Any]:
    """`gpt2-dutch train --dataset-path D --model-size auto --max-time BUDGET --seed S` (+ overrides), through
    train(TrainConfig(...)); what it did is read from what the run publishes."""
    from gpt2_dutch.train import TrainConfig, train

    # auto: our defaults given only a budget, as a user who wants the best model for it would run them
    cfg = TrainConfig(**{"model_size": "auto", **overrides, "dataset_path": str(dataset), "max_time": f"{budget_s}s",
                         "seed": seed, "output_dir": str(out)})
    with contextlib.redirect_stdout(sys.stderr):
        run = train(cfg)
    info = read_run_config(run)
    records = read_metrics(run)
    end = next(i for i, r in enumerate(records) if metric_kind(r) == "summary")
    # The Trainer's train_runtime holds the evaluations along the way, which --max-time leaves out of its budget:
    # take them out again (its checkpoints, well under a second each for tiny, stay in).
    evals = sum(r.get("eval_runtime", 0.0) for r in records[:end])
    # measuring the speed for the budget's choices (train/budget.py) comes out of the budget: count it
    measuring = info.get("chosen_for_budget", {}).get("measuring_seconds", 0.0)
    steps = records[end]["step"]
    return {"steps": steps, "train_seconds": records[end]["train_runtime"] - evals + measuring,
            "measuring_seconds": measuring, "eval_seconds": evals,
            "tokens": steps * info["tokens_per_step"], "parameters": info["parameters"],
            "seconds_per_step_measured": info.get("seconds_per_step"), "model": str(run / "final_model"),
            "settings": {**{k: info[k] for k in SHOWN_SETTINGS if k in info},
                         **{k: info.get(k, v) for k, v in overrides.items()}}}


def _baseline(data: Any, tokenizer: str, budget_s: float, seed: int, out: Path) -> dict[str, Any]:
    from gpt2_dutch.bench.baselines import quality_recipe

    with contextlib.redirect_stdout(sys.stderr):
        return quality_recipe(data, tokenizer, str(out), budget_s, seed)


def _score(model_dir: str, heldout: Path) -> dict[str, Any]:
    """`gpt2-dutch evaluate --model-path M --data-files heldout.jsonl --precision fp32`: the same documents, the
    same code, the same dtype for both sides."""
    from gpt2_dutch.evaluate import EvaluateConfig, evaluate

    with contextlib.redirect_stdout(sys.stderr):
        r = evaluate(EvaluateConfig(model_path=model_dir, data_files=[str(heldout)], precision="fp32"))
    return {"bits_per_byte": r["bits_per_byte"], "loss": r["loss"], "tokens_scored": r["tokens_scored"]}


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

