"""Our speed against the standard recipes, side by side in one run, next to this device's measured limits.

    gpt2-dutch bench                         # limits + preprocess + train + generate (~7 min on 2 CPU cores)
    gpt2-dutch bench train                   # one part: preprocess, train or generate
    gpt2-dutch bench --quick                 # every part on small inputs in ~20 s (CI)
    gpt2-dutch bench --json b.json --markdown b.md --plot b.png

Each of our results is measured next to its baseline (gpt2_dutch/baselines.py: run_clm.py's data path, a
run_clm-style fp32 Trainer, plain fp32 `model.generate`) on the same data in the same run and reported as a
ratio, so the figures hold on a noisy shared machine. Rates are also given as a fraction of the limit that
bounds them: the bare encoder for preprocessing (ours and the recipe's), the matmul peak of the dtype for
training (MFU), memory bandwidth for batch-1 decoding.
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
from .bench_report import ratios, write_outputs
from .config import option
from .errors import check

PARTS = ["all", "preprocess", "train", "generate"]
REFERENCE_TEXT = Path("../shared/data/dutch/train.jsonl.gz")  # the project's benchmark corpus, in a checkout


@dataclass
class BenchConfig:
    part: str = option("all", "what to measure: all, preprocess, train or generate", positional=True,
                       choices=PARTS)
    quick: bool = option(False, "small inputs, the tiny model and few steps: every part in ~20 s (CI)")
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
            results["preprocess"] = bench_preprocess(text, results["text"]["mb"], tokenizer, tmp, cfg.quick)
        if "train" in parts:
            results["train"] = bench_train(text, tokenizer, tmp, cfg.quick, results["limits"])
        if "generate" in parts:
            say("generate: gpt2-dutch vs plain fp32 model.generate")
            results["generate"] = bench_generate(tokenizer, tmp, cfg.quick, results["limits"])
    results["ratios"] = ratios(results)
    out = Path(cfg.output_dir)
    write_outputs(results, {"json": Path(cfg.json or out / "bench.json"),
                            "markdown": Path(cfg.markdown or out / "bench.md"),
                            "plot": Path(cfg.plot or out / "bench.png")})
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
import json, os, resource, sys, time
from pathlib import Path
import datasets, transformers, tokenizers
from gpt2_dutch.baselines import preprocess_recipe
from gpt2_dutch.data import iter_local_texts
from gpt2_dutch.preprocess import PreprocessConfig, preprocess
from gpt2_dutch.tokenizer import BatchEncoder, load_tokenizer
side, text, tok, out, cache, chunk = sys.argv[1:7]
if side in ("encoder", "tokenizers"):  # the limits: bare batch encoders on texts already in memory
    texts = list(iter_local_texts([Path(text)], "text", "paragraph"))
    encoder = BatchEncoder(load_tokenizer(tok), os.cpu_count(), "auto" if side == "encoder" else "tokenizers")
    encoder(texts[:64])  # the one-time check against tokenizers happens here, not on the clock
t0 = time.perf_counter()
if side == "recipe":
    stored = preprocess_recipe(text, tok, out, cache, int(chunk))
elif side in ("encoder", "tokenizers"):
    stored = {"tokens": sum(len(ids) for i in range(0, len(texts), 1000) for ids in encoder(texts[i:i + 1000])),
              "encoder": encoder.name}
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
    from .decode_speed import run_benchmark
    from .model import gpt2_config, matmul_params
    from .model_loading import load_model

    size = "tiny" if quick else "small"
    new_tokens, repeats, batch = (16, 1, 16) if quick else (64, 3, 16)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_dir = tmp / f"generate-{size}"
    torch.manual_seed(0)  # random weights: decoding speed does not depend on their values
    model = AutoModelForCausalLM.from_config(gpt2_config(size, len(tok), 1024, tok.eos_token_id))
    n_matmul = matmul_params(model)  # all but the position table; counted before load_model packs the layers
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    del model
    model, tokenizer, _ = load_model(model_dir)
    ours = run_benchmark(model, tokenizer, new_tokens, batch, repeats=repeats)
    weight_bytes = n_matmul * model.transformer.wte.weight.element_size()
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
