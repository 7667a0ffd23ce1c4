"""Decode speed of a loaded model: tokens/s at batch 1 and a larger batch, time to first token, per-token latency.

    gpt2-dutch generate --model-path M --benchmark --benchmark-batch 16

`gpt2-dutch bench` (bench/generate_speed.py) uses the same measurement to compare against plain `model.generate`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from gpt2_dutch.core.errors import check
from gpt2_dutch.model.cpu_kernels import parameter_count


class _TokenClock:
    """A generate() streamer that only timestamps each step: put() is called once per generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def _timed_generate(model: Any, enc: dict[str, torch.Tensor], new_tokens: int, pad_id: int) -> dict[str, Any]:
    clock = _TokenClock()
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    # min_new_tokens = max_new_tokens: every run produces exactly the same number of tokens (EOS ignored)
    model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=pad_id, streamer=clock if enc["input_ids"].shape[0] == 1 else None)
    sync()  # generate may return before the GPU has finished its last kernels
    total = time.perf_counter() - start
    result: dict[str, Any] = {"seconds": total}
    if clock.times:  # times[0] is the prompt being "put"; times[1] the first generated token
        result["ttft_s"] = clock.times[1] - start
        result["latencies_s"] = [b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False)]
    return result


def run_benchmark(model: Any, tokenizer: Any, max_new_tokens: int, batch_size: int, prompt_tokens: int = 32,
                  repeats: int = 3) -> dict[str, Any]:
    """Decode speed at batch 1 and at a larger batch, after a warm-up run (not counted)."""
    torch.manual_seed(0)
    ctx = model.config.n_positions
    prompt_tokens = min(prompt_tokens, max(1, ctx // 4))
    new = min(max_new_tokens, ctx - prompt_tokens)
    check(new > 0, f"the model's context ({ctx}) is too short for a {prompt_tokens}-token benchmark prompt")
    vocab = model.config.vocab_size
    out: dict[str, Any] = {"device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
                           "parameters": parameter_count(model), "prompt_tokens": prompt_tokens,
                           "new_tokens": new, "threads": torch.get_num_threads()}
    for batch in sorted({1, batch_size}):
        ids = torch.randint(0, vocab, (batch, prompt_tokens), device=model.device)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        _timed_generate(model, enc, min(new, 8), tokenizer.eos_token_id)  # warm-up
        runs = [_timed_generate(model, enc, new, tokenizer.eos_token_id) for _ in range(repeats)]
        secs = statistics.median(r["seconds"] for r in runs)
        entry: dict[str, Any] = {"tokens_per_s": batch * new / secs, "seconds": secs}
        if batch == 1:
            lat = sorted(x for r in runs for x in r["latencies_s"])
            entry.update(ttft_ms=1000 * statistics.median(r["ttft_s"] for r in runs),
                         latency_p50_ms=1000 * lat[len(lat) // 2], latency_p90_ms=1000 * lat[int(len(lat) * 0.9)])
        out[f"batch_{batch}"] = entry
    if batch_size != 1:
        out["batch_speedup"] = out[f"batch_{batch_size}"]["tokens_per_s"] / out["batch_1"]["tokens_per_s"]
    return out


def print_benchmark(r: dict[str, Any]) -> str:
    lines = [f"device {r['device']}, {r['dtype']}, {r['parameters'] / 1e6:.1f}M parameters, {r['threads']} threads,"
             f" {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens (median of 3, warm-up excluded)",
             f"{'batch':>6} {'tokens/s':>10} {'TTFT ms':>9} {'p50 ms/token':>13} {'p90 ms/token':>13}"]
    for key in sorted((k for k in r if k.startswith("batch_") and k != "batch_speedup"),
                      key=lambda k: int(k.split("_")[1])):
        e = r[key]
        extra = (f"{e['ttft_ms']:>9.1f} {e['latency_p50_ms']:>13.2f} {e['latency_p90_ms']:>13.2f}"
                 if "ttft_ms" in e else f"{'':>9} {'':>13} {'':>13}")
        lines.append(f"{key.split('_')[1]:>6} {e['tokens_per_s']:>10.1f} {extra}")
    if "batch_speedup" in r:
        lines.append(f"batch speed-up over batch 1: {r['batch_speedup']:.1f}x")
    return "\n".join(lines)
