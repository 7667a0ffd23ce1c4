"""Our speed against the standard recipes, side by side in one run, next to this device's measured limits.

    gpt2-dutch bench                         # limits + preprocess + train + generate (~10 min on 2 CPU cores)
    gpt2-dutch bench train                   # one part: preprocess, train or generate
    gpt2-dutch bench --quick                 # every part on small inputs in about a minute (CI)
    gpt2-dutch bench --json b.json --markdown b.md --plot b.png

Each of our results is measured next to its baseline (gpt2_dutch/baselines.py: run_clm.py's data path, a
run_clm-style fp32 Trainer, plain fp32 `model.generate`) on the same data in the same run and reported as a
ratio, so the figures hold on a noisy shared machine. Rates are also given as a fraction of the limit that
bounds them: the matmul peak of the dtype for training (MFU), memory bandwidth for batch-1 decoding.
Text: --data-file, else ../shared/data/dutch/train.jsonl.gz when run from a checkout that has it, else the
built-in sample. Tokenizer: --tokenizer, else a Dutch BPE trained on that text before any timing.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import option
from .errors import check

PARTS = ["all", "preprocess", "train", "generate"]
REFERENCE_TEXT = Path("../shared/data/dutch/train.jsonl.gz")  # the project's benchmark corpus, in a checkout
# The targets for a 2-core CPU from the project's issues; the train and generate ones are for `small`.
TARGETS = {"preprocess_speedup": 2.0, "train_small_speedup": 2.0, "train_small_mfu": 0.5,
           "train_small_compile_speedup": 2.0, "train_small_compile_mfu": 0.5,
           "generate_batch1_speedup": 1.5, "generate_batch16_over_batch1": 8.0}


@dataclass
class BenchConfig:
    part: str = option("all", "what to measure: all, preprocess, train or generate", positional=True,
                       choices=PARTS)
    quick: bool = option(False, "small inputs, the tiny model and few steps: every part in about a minute (CI)")
    data_file: str | None = option(None, "benchmark text: a .jsonl(.gz) file with a 'text' field (default: "
                                   f"{REFERENCE_TEXT} when present, else the built-in sample)")
    tokenizer: str | None = option(None, "tokenizer for every part (default: a Dutch BPE trained on the text)")
    output_dir: str = option("bench_results", "where bench.json, bench.md and bench.png are written")
    json: str | None = option(None, "write the JSON results here instead")
    markdown: str | None = option(None, "write the markdown table here instead")
    plot: str | None = option(None, "write the bar chart of the ratios (PNG) here instead")

    def __post_init__(self) -> None:
        if self.data_file is not None:
            path = Path(self.data_file)
            check(path.is_file(), f"--data-file {path} not found")
            check(path.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")), f"--data-file {path}: the "
                  "run_clm baseline reads JSON lines; give a .jsonl or .jsonl.gz file with a 'text' field")


def bench(cfg: BenchConfig) -> dict[str, Any]:
    from .sample import builtin_sample_path

    # One device, one process: no DDP relaunch and no Trainer DataParallel on a machine with several GPUs.
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "GPT2_DUTCH_NO_RELAUNCH")}
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    os.environ["GPT2_DUTCH_NO_RELAUNCH"] = "1"
    try:
        return _bench(cfg, builtin_sample_path())
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _bench(cfg: BenchConfig, builtin: Path) -> dict[str, Any]:
    if cfg.data_file:
        text = Path(cfg.data_file)
    else:
        text = REFERENCE_TEXT if REFERENCE_TEXT.is_file() and not cfg.quick else builtin
    parts = PARTS[1:] if cfg.part == "all" else [cfg.part]
    results: dict[str, Any] = {"version": __version__, "quick": cfg.quick, "machine": machine_info(),
                               "text": {"file": str(text), "mb": text_megabytes(text)}}
    say(f"device limits ({results['machine']['device']})")
    results["limits"] = measure_limits(cfg.quick)
    with tempfile.TemporaryDirectory(prefix="gpt2-dutch-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tokenizer = cfg.tokenizer or train_bench_tokenizer(text, tmp / "tokenizer", 4096 if cfg.quick else 32768)
        results["tokenizer"] = cfg.tokenizer or "Dutch BPE trained on the benchmark text"
        if "preprocess" in parts:
            say("preprocess: gpt2-dutch vs the run_clm.py recipe")
            results["preprocess"] = bench_preprocess(text, tokenizer, tmp, cfg.quick)
        if "train" in parts:
            results["train"] = bench_train(text, tokenizer, tmp, cfg.quick, results["limits"])
        if "generate" in parts:
            say("generate: gpt2-dutch vs plain fp32 model.generate")
            results["generate"] = bench_generate(tokenizer, tmp, cfg.quick, results["limits"])
    results["ratios"] = ratios(results)
    write_outputs(cfg, results)
    return results


def say(message: str) -> None:
    print(f"== {message}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "device": gpu or f"{cpu}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "python": platform.python_version()}


def text_megabytes(path: Path) -> float:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return sum(len(json.loads(line)["text"].encode("utf-8")) for line in f if line.strip()) / 1e6


# ------------------------------------------------------------------------------------------ device limits

def _best_seconds(fn: Any, args: tuple, repeats: int, sync: Any) -> float:
    fn(*args)
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_limits(quick: bool) -> dict[str, Any]:
    """Matmul peak per dtype (best of several square matmuls) and memory bandwidth (copy and read)."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = 8192 if cuda else (1024 if quick else 2048)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16} | ({"fp16": torch.float16} if cuda else {})
    peaks = {}
    for name, dtype in dtypes.items():
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        peaks[name] = 2 * n**3 / _best_seconds(torch.matmul, (a, b), 3 if quick else 5, sync)
        del a, b
    size = (64 if quick else 512) * 2**20 // 4 * (8 if cuda else 1)  # floats; far larger than any cache
    src = torch.ones(size, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(torch.Tensor.copy_, (dst, src), 5, sync)
    read_s = _best_seconds(torch.sum, (src,), 5, sync)
    del src, dst
    return {"matmul_flops": peaks, "matmul_size": n, "copy_bytes_per_s": 2 * size * 4 / copy_s,
            "read_bytes_per_s": size * 4 / read_s}


# ------------------------------------------------------------------------------------------ preprocess

def train_bench_tokenizer(text: Path, out: Path, vocab_size: int) -> str:
    from .data import iter_local_texts
    from .tokenizer import train_bpe

    say(f"training a {vocab_size}-token Dutch BPE on {text.name} for the benchmark (not timed)")
    train_bpe(iter_local_texts([text], "text", "paragraph"), vocab_size).save_pretrained(str(out))
    return str(out)


# Each side runs in a fresh process (its peak RSS is its own), libraries imported before the clock starts.
_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import datasets, transformers, tokenizers
from gpt2_dutch.baselines import preprocess_recipe
from gpt2_dutch.data import iter_local_texts
from gpt2_dutch.preprocess import PreprocessConfig, preprocess
from gpt2_dutch.tokenizer import load_tokenizer
side, text, tok, out, cache, chunk = sys.argv[1:7]
if side == "encoder":  # the limit: the bare Rust batch encoder on texts already in memory
    texts, encoder = list(iter_local_texts([Path(text)], "text", "paragraph")), load_tokenizer(tok).backend_tokenizer
t0 = time.perf_counter()
if side == "recipe":
    stored = preprocess_recipe(text, tok, out, cache, int(chunk))
elif side == "encoder":
    stored = {"tokens": sum(len(e.ids) for i in range(0, len(texts), 1000)
                            for e in encoder.encode_batch_fast(texts[i:i + 1000], add_special_tokens=False))}
else:
    path = preprocess(PreprocessConfig(data_files=[text], tokenizer=tok, output_dir=out, name="d",
                                       chunk_size=int(chunk), streaming=True))
    stored = {"tokens": sum(s["chunks"] for s in json.loads((path / "manifest.json").read_text())["splits"]
                            .values()) * int(chunk)}
seconds = time.perf_counter() - t0
stored["bytes_on_disk"] = sum(f.stat().st_size for f in Path(out).rglob("*.arrow"))
# VmHWM is this process's own peak; ru_maxrss would also count the parent's memory copied at fork.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")] if sys.platform == "linux" else []
peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, **stored}))
"""


def _run_child(side: str, text: Path, tokenizer: str, out: Path, chunk: int) -> dict[str, Any]:
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "true"}
    r = subprocess.run([sys.executable, "-c", _CHILD, side, str(text), tokenizer, str(out), str(out) + ".cache",
                        str(chunk)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"bench preprocess ({side}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_preprocess(text: Path, tokenizer: str, tmp: Path, quick: bool) -> dict[str, Any]:
    mb = text_megabytes(text)
    chunk = 128 if quick else 1024
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "recipe": [], "encoder": []}
    for i in range(1 if quick else 2):  # alternate the sides; keep each side's fastest run
        for side in runs:
            runs[side].append(_run_child(side, text, tokenizer, tmp / f"pre-{side}-{i}", chunk))
    ours, recipe, encoder = (min(runs[s], key=lambda r: r["seconds"]) for s in runs)
    result: dict[str, Any] = {
        "text_mb": mb, "chunk_size": chunk,
        "ours_mb_per_s": mb / ours["seconds"], "recipe_mb_per_s": mb / recipe["seconds"],
        "speedup": recipe["seconds"] / ours["seconds"],
        # The bound: tokenizing is most of the work, so no pipeline on this encoder beats its bare speed.
        "encoder_mb_per_s": mb / encoder["seconds"], "ours_fraction_of_encoder": encoder["seconds"] / ours["seconds"],
        "recipe_fraction_of_encoder": encoder["seconds"] / recipe["seconds"],
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


# ------------------------------------------------------------------------------------------ train

def bench_train(text: Path, tokenizer: str, tmp: Path, quick: bool, limits: dict[str, Any]) -> dict[str, Any]:
    from .baselines import StepTimer, train_recipe
    from .preprocess import PreprocessConfig, preprocess
    from .train import TrainConfig, train

    seq = 128 if quick else 512
    dataset = preprocess(PreprocessConfig(data_files=[str(text)], tokenizer=tokenizer, chunk_size=seq,
                                          output_dir=str(tmp), name=f"train-{seq}"))
    warmup = 2  # the first steps pay for allocation (and, with --compile, compilation): not counted
    # (name, size, batch, timed steps, --compile); --compile is what the README recommends for long runs
    plan = [("tiny", "tiny", 8, 3 if quick else 10, False)]
    if not quick:
        plan += [("small", "small", 4, 6, False), ("small_compile", "small", 4, 6, True)]
    out: dict[str, Any] = {"sequence": seq, "warmup_steps": warmup}
    recipe_tps: dict[str, float] = {}
    peaks = limits["matmul_flops"]
    for name, size, batch, timed, compile_ in plan:
        steps = warmup + timed
        if size not in recipe_tps:
            say(f"train {size} at {batch}x{seq}: a run_clm-style fp32 Trainer (baseline)")
            timer = StepTimer()
            train_recipe(str(dataset), size, batch, steps, str(tmp / "recipe-run"), timer)
            recipe_tps[size] = batch * seq / timer.median_step_s(warmup)
            gc.collect()
        say(f"train {size} at {batch}x{seq}: gpt2-dutch{' --compile' if compile_ else ''}")
        timer = StepTimer()
        run = train(TrainConfig(dataset_path=str(dataset), model_size=size, batch_size=batch, max_steps=steps,
                                warmup=0, eval_every=10**6, save_every=10**6, log_every=10**6, eval_chunks=batch,
                                compile=compile_, output_dir=str(tmp / "runs"), keep_checkpoints=1),
                    callbacks=[timer])
        gc.collect()
        info = json.loads((run / "run_config.json").read_text())
        ours_tps = batch * seq / timer.median_step_s(warmup)
        flops = info["flops_per_token"]
        out[name] = {
            "model_size": size, "compile": compile_, "batch": batch, "timed_steps": timed,
            "parameters": info["parameters"], "flops_per_token": flops, "ours_precision": info["precision"],
            "ours_tokens_per_s": ours_tps, "recipe_tokens_per_s": recipe_tps[size],
            "speedup": ours_tps / recipe_tps[size],
            "ours_mfu": ours_tps * flops / peaks.get(info["precision"], peaks["fp32"]),
            "recipe_mfu": recipe_tps[size] * flops / peaks["fp32"],
        }
    return out


# ------------------------------------------------------------------------------------------ generate

def bench_generate(tokenizer_dir: str, tmp: Path, quick: bool, limits: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .baselines import generate_recipe
    from .generate import GenerateConfig, load_model, run_benchmark
    from .model import gpt2_config

    size = "tiny" if quick else "small"
    new_tokens, repeats, batch = (16, 1, 16) if quick else (64, 3, 16)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_dir = tmp / f"generate-{size}"
    torch.manual_seed(0)  # random weights: decoding speed does not depend on their values
    model = AutoModelForCausalLM.from_config(gpt2_config(size, len(tok), 1024, tok.eos_token_id))
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    del model
    model, tokenizer, _ = load_model(model_dir)
    ours = run_benchmark(model, tokenizer, GenerateConfig(max_new_tokens=new_tokens, benchmark_batch=batch),
                         repeats=repeats)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - (
        model.transformer.wpe.weight.numel() * model.transformer.wpe.weight.element_size())
    del model
    gc.collect()
    recipe = generate_recipe(str(model_dir), ours["prompt_tokens"], ours["new_tokens"], [1, batch], repeats)
    b1, bn = ours["batch_1"]["tokens_per_s"], ours[f"batch_{batch}"]["tokens_per_s"]
    # Batch-1 decoding reads every weight once per token: bandwidth / weight bytes bounds its tokens/s.
    bound = limits["read_bytes_per_s"] / weight_bytes
    return {
        "model_size": size, "parameters": ours["parameters"], "prompt_tokens": ours["prompt_tokens"],
        "new_tokens": ours["new_tokens"], "batch": batch, "ours_dtype": ours["dtype"], "recipe_dtype": recipe["dtype"],
        "ours_batch1_tokens_per_s": b1, "recipe_batch1_tokens_per_s": recipe["batch_1"]["tokens_per_s"],
        "ours_batchN_tokens_per_s": bn, "recipe_batchN_tokens_per_s": recipe[f"batch_{batch}"]["tokens_per_s"],
        "ours_ttft_ms": ours["batch_1"]["ttft_ms"], "recipe_ttft_ms": recipe["batch_1"]["ttft_ms"],
        "ours_latency_p50_ms": ours["batch_1"]["latency_p50_ms"],
        "batch1_speedup": b1 / recipe["batch_1"]["tokens_per_s"], "batchN_over_batch1": bn / b1,
        "weight_bytes": weight_bytes, "batch1_bandwidth_bound_tokens_per_s": bound,
        "batch1_fraction_of_bandwidth_bound": b1 / bound,
    }


# ------------------------------------------------------------------------------------------ report

def ratios(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> {value, target (or None), met}: what the bar chart and the summary show."""
    out: dict[str, float] = {}
    if "preprocess" in r:
        out["preprocess_speedup"] = r["preprocess"]["speedup"]
    for size, t in r.get("train", {}).items():
        if isinstance(t, dict):
            out[f"train_{size}_speedup"] = t["speedup"]
            out[f"train_{size}_mfu"] = t["ours_mfu"]
    if "generate" in r:
        g = r["generate"]
        suffix = "" if g["model_size"] == "small" else f"_{g['model_size']}"
        out[f"generate_batch1_speedup{suffix}"] = g["batch1_speedup"]
        out[f"generate_batch{g['batch']}_over_batch1{suffix}"] = g["batchN_over_batch1"]
    # --quick runs on ~60 KB of text, where fixed start-up costs dominate: its ratios are not judged.
    targets = {} if r["quick"] else TARGETS
    return {k: {"value": v, "target": targets.get(k), "met": None if k not in targets else v >= targets[k]}
            for k, v in out.items()}


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, gpt2-dutch, baseline, ratio) rows shared by the screen and markdown tables."""
    rows = []
    if "preprocess" in r:
        p = r["preprocess"]
        rows.append((f"preprocess {p['text_mb']:.3g} MB of text, MB/s", f"{p['ours_mb_per_s']:.2f}",
                     f"{p['recipe_mb_per_s']:.2f}", f"{p['speedup']:.2f}x"))
        rows.append(("preprocess, fraction of the bare encoder's speed", f"{p['ours_fraction_of_encoder']:.0%}",
                     f"{p['recipe_fraction_of_encoder']:.0%}", f"of {p['encoder_mb_per_s']:.2f} MB/s"))
        rows.append(("preprocess peak memory, MB", f"{p['ours_peak_rss_mb']:.0f}", f"{p['recipe_peak_rss_mb']:.0f}",
                     f"{p['recipe_peak_rss_mb'] / p['ours_peak_rss_mb']:.2f}x less"))
        less = p["recipe_bytes_per_token"] / p["ours_bytes_per_token"]
        rows.append(("preprocess bytes per stored token", f"{p['ours_bytes_per_token']:.2f}",
                     f"{p['recipe_bytes_per_token']:.2f}", f"{less:.1f}x less"))
        if "ours_10x_mb_per_s" in p:
            rows.append(("preprocess 10x the text (streamed): MB/s, peak MB", f"{p['ours_10x_mb_per_s']:.2f}, "
                         f"{p['ours_10x_peak_rss_mb']:.0f}", "", ""))
    for t in r.get("train", {}).values():
        if isinstance(t, dict):
            shape = f"{t['batch']}x{r['train']['sequence']}"
            how = t["ours_precision"] + (" + compile" if t["compile"] else "")
            rows.append((f"train {t['model_size']} {shape}, tokens/s ({how} vs fp32)",
                         f"{t['ours_tokens_per_s']:.0f}", f"{t['recipe_tokens_per_s']:.0f}", f"{t['speedup']:.2f}x"))
            rows.append((f"train {t['model_size']} MFU (of the dtype's matmul peak)", f"{t['ours_mfu']:.1%}",
                         f"{t['recipe_mfu']:.1%}", ""))
    if "generate" in r:
        g = r["generate"]
        rows.append((f"generate {g['model_size']} batch 1, tokens/s ({g['ours_dtype']} vs {g['recipe_dtype']})",
                     f"{g['ours_batch1_tokens_per_s']:.1f}", f"{g['recipe_batch1_tokens_per_s']:.1f}",
                     f"{g['batch1_speedup']:.2f}x"))
        rows.append((f"generate {g['model_size']} batch {g['batch']}, tokens/s", f"{g['ours_batchN_tokens_per_s']:.1f}",
                     f"{g['recipe_batchN_tokens_per_s']:.1f}",
                     f"{g['ours_batchN_tokens_per_s'] / g['recipe_batchN_tokens_per_s']:.2f}x"))
        rows.append((f"generate batch {g['batch']} / batch 1", f"{g['batchN_over_batch1']:.1f}x",
                     f"{g['recipe_batchN_tokens_per_s'] / g['recipe_batch1_tokens_per_s']:.1f}x", ""))
        rows.append(("generate time to first token, ms", f"{g['ours_ttft_ms']:.1f}", f"{g['recipe_ttft_ms']:.1f}",
                     f"{g['recipe_ttft_ms'] / g['ours_ttft_ms']:.2f}x"))
        rows.append(("generate batch 1, fraction of the bandwidth bound",
                     f"{g['batch1_fraction_of_bandwidth_bound']:.0%} of {g['batch1_bandwidth_bound_tokens_per_s']:.0f}",
                     "", ""))
    return rows


def limits_line(r: dict[str, Any]) -> str:
    lim = r["limits"]
    peaks = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in lim["matmul_flops"].items())
    return (f"{r['machine']['device']}; torch {r['machine']['torch']}; matmul peak GFLOP/s: {peaks}; memory "
            f"bandwidth GB/s: copy {lim['copy_bytes_per_s'] / 1e9:.1f}, read {lim['read_bytes_per_s'] / 1e9:.1f}")


def markdown(r: dict[str, Any]) -> str:
    lines = [f"Measured by `gpt2-dutch bench{' --quick' if r['quick'] else ''}` (gpt2-dutch {r['version']}) on "
             f"{limits_line(r)}.", "", "| benchmark | gpt2-dutch | baseline | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table_rows(r)]
    targets = [f"{k} {v['value']:.2f} (target {v['target']}: {'met' if v['met'] else 'missed'})"
               for k, v in r["ratios"].items() if v["target"] is not None]
    if targets:
        lines += ["", "Targets: " + "; ".join(targets) + "."]
    return "\n".join(lines) + "\n"


def screen(r: dict[str, Any]) -> str:
    rows = [("benchmark", "gpt2-dutch", "baseline", "ratio"), *table_rows(r)]
    w = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [limits_line(r)]
    lines += [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d:>{w[3]}}" for a, b, c, d in rows]
    return "\n".join(lines)


def plot_ratios(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(k, v) for k, v in r["ratios"].items() if not k.endswith("_mfu")]
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(items) + 1.6), dpi=110)
    names = [k.replace("_", " ") for k, _ in items]
    values = [v["value"] for _, v in items]
    colors = ["tab:green" if v["met"] else "tab:red" if v["met"] is False else "tab:blue" for _, v in items]
    ax.barh(names, values, color=colors)
    for i, (_, v) in enumerate(items):
        if v["target"] is not None:
            ax.plot([v["target"]] * 2, [i - 0.4, i + 0.4], "k--", lw=1.2)
        ax.text(v["value"], i, f" {v['value']:.2f}x", va="center")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("gpt2-dutch / baseline (dashed: target)")
    ax.set_title(f"gpt2-dutch bench on {r['machine']['device']}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(cfg: BenchConfig, r: dict[str, Any]) -> None:
    out = Path(cfg.output_dir)
    paths = {"json": Path(cfg.json or out / "bench.json"), "markdown": Path(cfg.markdown or out / "bench.md"),
             "plot": Path(cfg.plot or out / "bench.png")}
    _write(paths["json"], json.dumps(r, indent=2) + "\n")
    _write(paths["markdown"], markdown(r))
    paths["plot"].parent.mkdir(parents=True, exist_ok=True)
    plot_ratios(r, paths["plot"])
    print(screen(r))
    met = [f"{k} {v['value']:.2f}/{v['target']} {'met' if v['met'] else 'MISSED'}" for k, v in r["ratios"].items()
           if v["target"] is not None]
    if met:
        print("targets: " + "; ".join(met))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
