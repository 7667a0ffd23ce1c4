"""Budget-aware defaults for runs given a budget (`--max-time` or `--max-tokens`).

    gpt2-dutch train --dataset-path D --model-size auto --max-time 30m   # the preset that suits 30 minutes here
    gpt2-dutch train --dataset-path D --model-size tiny --max-time 4m    # tokens per step chosen for 4 minutes

Two choices, both from the compute C = training FLOPs of the run (flops_per_token x tokens), and both only where
the user did not decide (an explicit --model-size / --batch-size always wins):

- `--model-size auto`: the GPT-2 preset closest to compute-optimal, i.e. to ~20 training tokens per parameter
  (Hoffmann et al. 2022, "Chinchilla"), compared on a log scale. With --max-tokens the tokens are known; with
  --max-time they come from the tokens/s measured here: each preset, smallest first, trains two micro-batches
  on random tokens (after one that warms up) until one would see fewer than 20 tokens per parameter, since every
  larger one sees fewer still. The seconds spent measuring are taken from the budget.
- tokens per step, when --batch-size is not given: DeepSeek LLM's fit of the best batch size to compute,
  B = 0.292 * C^0.3271 tokens (Bi et al. 2024, eq. 1; fitted from 1e17 to 3e20 FLOPs), but no more than leaves
  the run MIN_STEPS steps, in whole chunks; beyond MICRO_BATCH chunks per device the rest comes from gradient
  accumulation. Short runs get small steps and so more of them: for a short budget, steps matter more than
  tokens per step.
- the peak learning rate, when --learning-rate is not given: DeepSeek LLM's fit eta = 0.3118 * C^-0.125 (eq. 1
  of the same paper, fitted with that batch size), times sqrt(B / B_fit) when the step's B tokens are fewer
  than the fit's B_fit (the square-root rule for Adam: Malladi et al. 2022). Under Muon this is AdamW's rate
  (embeddings, LM head, LayerNorms, biases), and there 1.5x the fit (MUON_ADAMW_LR_FACTOR); Muon's own stays
  0.02. For a minute-scale CPU run the fit gives more than the size table's 2e-3, and trained better; for
  `small` over ~1e18 FLOPs it gives the rate llm.c found best for GPT-2 124M (docs/experiments/budget.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from gpt2_dutch.core.errors import UsageError, check
from gpt2_dutch.model.presets import MODEL_PRESETS

TOKENS_PER_PARAM = 20  # Chinchilla's compute-optimal ratio
MICRO_BATCH = 8  # chunks per device per forward when the batch is chosen here (the old default --batch-size)
DEFAULT_BATCH = 8  # --batch-size of a run without a budget
# The fit below comes from runs of 1e17+ FLOPs with thousands of steps; extrapolated to a few minutes on a CPU
# (1e13) it leaves a run ~20 steps, and there fewer tokens per step won clearly. So a run gets at least this many
# steps; 150 and not 100 because the speed probe leaves out the optimizer and the data, so runs planned for 100
# got fewer, and fewer than ~100 cost quality (docs/experiments/budget.md).
MIN_STEPS = 150


def optimal_tokens_per_step(train_flops: float) -> float:
    """DeepSeek LLM (Bi et al. 2024), eq. 1: B_opt = 0.292 * C^0.3271 tokens per step."""
    return 0.292 * train_flops ** 0.3271


@dataclass
class Batch:
    batch_size: int  # chunks per device per micro-batch
    accumulation: int  # micro-batches per step
    reason: str


def choose_batch(train_flops: float, tokens: float, context: int, world: int, accumulation: int | None) -> Batch:
    """Chunks per micro-batch and micro-batches per step for a run of `train_flops` over `tokens`;
    `accumulation` if the user gave --gradient-accumulation-steps."""
    fit = optimal_tokens_per_step(train_flops)
    target = min(fit, tokens / MIN_STEPS)
    per_device = max(1, round(target / (context * world)))
    if accumulation is None:
        accumulation = math.ceil(per_device / MICRO_BATCH)
    batch = max(1, math.ceil(per_device / accumulation))
    per_step = batch * accumulation * world * context
    why = (f"DeepSeek LLM's fit: {fit:,.0f}" if target == fit else
           f"at least {MIN_STEPS} steps in {tokens:.3g} tokens; DeepSeek LLM's fit would be {fit:,.0f}")
    return Batch(batch, accumulation, f"{per_step:,} tokens per step for a run of {train_flops:.2g} FLOPs ({why})")


def optimal_learning_rate(train_flops: float) -> float:
    """DeepSeek LLM (Bi et al. 2024), eq. 1: eta_opt = 0.3118 * C^-0.1250."""
    return 0.3118 * train_flops ** -0.125


@dataclass
class LearningRate:
    learning_rate: float
    reason: str


# Under Muon, AdamW's rate (what --learning-rate sets) trains only the embedding tables, the LM head, LayerNorms
# and biases, not the blocks' matrices the fit was made for: 1.5x the fit trained better there, 2x worse
# (docs/experiments/optimizer.md).
MUON_ADAMW_LR_FACTOR = 1.5


def choose_learning_rate(train_flops: float, tokens_per_step: int, muon: bool = False) -> LearningRate:
    """The peak learning rate for a run of `train_flops` with `tokens_per_step` (see the module doc); `muon`:
    AdamW's rate beside Muon (MUON_ADAMW_LR_FACTOR)."""
    fit, b_fit = optimal_learning_rate(train_flops), optimal_tokens_per_step(train_flops)
    scale = min(1.0, (tokens_per_step / b_fit) ** 0.5)
    why = f"DeepSeek LLM's fit for {train_flops:.2g} FLOPs is {fit:.3g}"
    if scale < 1:
        why += (f", x {scale:.2f} for {tokens_per_step:,} tokens per step instead of the fit's {b_fit:,.0f} "
                "(square-root rule)")
    if muon:
        scale *= MUON_ADAMW_LR_FACTOR
        why += f", x {MUON_ADAMW_LR_FACTOR:g} for AdamW's parameters beside Muon"
    return LearningRate(fit * scale, why)


@dataclass
class SizeChoice:
    size: str
    tokens_per_s: float | None  # measured for the chosen size (None: --max-tokens, nothing measured)
    probe_seconds: float
    reason: str


def params_of(size: str, vocab_size: int, context: int) -> int:
    """Parameters of a preset, without building it, counting the token embedding once (as GPT-2's tied head):
    an untied head's second [vocab, width] table adds no compute per token (the embedding is a lookup), so
    --model-size auto chooses the same either way."""
    p = MODEL_PRESETS[size]
    d = p.n_embd
    block = 12 * d * d + 13 * d  # attention 4d^2 + MLP 8d^2, their biases and two LayerNorms
    return vocab_size * d + context * d + p.n_layer * block + 2 * d


def choose_model_size(vocab_size: int, context: int, eos_token_id: int, precision: str, max_tokens: float | None,
                      budget_s: float | None, loss_chunk_tokens: int, world: int,
                      tie_embeddings: bool = True) -> SizeChoice:
    """The preset for --model-size auto (see the module doc)."""
    check(max_tokens is not None or budget_s is not None, "--model-size auto needs a budget to size the model "
          "for: give --max-time (e.g. 30m) or --max-tokens (e.g. 5e8), or pick a --model-size")
    sizes = list(MODEL_PRESETS)

    def ratio(size: str, tokens: float) -> float:
        return tokens / params_of(size, vocab_size, context)

    def closest(candidates: dict[str, float]) -> str:
        return min(candidates, key=lambda s: abs(math.log(ratio(s, candidates[s]) / TOKENS_PER_PARAM)))

    if max_tokens is not None and budget_s is None:
        chosen = closest({s: max_tokens for s in sizes})
        return SizeChoice(chosen, None, 0.0, f"{max_tokens:.3g} tokens give {ratio(chosen, max_tokens):.3g} tokens "
                          f"per parameter (compute-optimal: ~{TOKENS_PER_PARAM})")
    assert budget_s is not None
    start = time.perf_counter()
    tokens: dict[str, float] = {}
    speed: dict[str, float] = {}
    for size in sizes:
        speed[size] = world * measure_tokens_per_s(size, vocab_size, context, eos_token_id, precision,
                                                   loss_chunk_tokens, tie_embeddings=tie_embeddings)
        tokens[size] = speed[size] * budget_s
        if max_tokens is not None:
            tokens[size] = min(tokens[size], max_tokens)
        if ratio(size, tokens[size]) < TOKENS_PER_PARAM:
            break  # larger presets would see fewer tokens per parameter still
    probe_s = time.perf_counter() - start
    chosen = closest(tokens)
    measured = ", ".join(f"{s} {speed[s]:,.0f}" for s in speed)
    return SizeChoice(chosen, speed[chosen], probe_s, f"about {tokens[chosen]:.3g} tokens in the budget at the "
                      f"measured tokens/s ({measured}): {ratio(chosen, tokens[chosen]):.3g} tokens per parameter, "
                      f"the closest to compute-optimal (~{TOKENS_PER_PARAM})")


def measure_tokens_per_s(size: str, vocab_size: int, context: int, eos_token_id: int, precision: str,
                         loss_chunk_tokens: int, chunks: int | None = None, tie_embeddings: bool = True) -> float:
    """Training tokens/s of a preset on this device: forward + backward of a micro-batch of random tokens, in
    the run's precision and loss path; the faster of two after one that warms up. Global RNG state is untouched."""
    import torch

    from gpt2_dutch.model.presets import gpt2_config
    from gpt2_dutch.train.loss import lm_head_loss_sum

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    chunks = chunks or (MICRO_BATCH if cuda else 2)  # a GPU needs a full micro-batch to show its speed
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.random.fork_rng(devices=[device] if cuda else []):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(gpt2_config(size, vocab_size, context, eos_token_id, tie_embeddings),
                                                 attn_implementation="sdpa").to(device)
        ids = torch.randint(0, vocab_size, (chunks, context), device=device)
    try:
        times = []
        for _ in range(3):  # the first warms up (allocations, kernel selection); the faster of the other two

            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                if loss_chunk_tokens:
                    out = model(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
                    loss = lm_head_loss_sum(out.hidden_states[-1], model.get_output_embeddings().weight, ids,
                                            loss_chunk_tokens)
                else:
                    loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        raise UsageError(f"--model-size auto: {size} does not fit this device's memory at {chunks} chunks of "
                         f"{context}; pick a --model-size") from None
    finally:
        del model
    return chunks * context / min(times[1:])


def train_flops(size: str, vocab_size: int, context: int, tokens: float) -> float:
    """Training FLOPs of `tokens` tokens for a preset (model.flops_per_token; position embeddings take no part)."""
    from gpt2_dutch.model.presets import flops_per_token

    p = MODEL_PRESETS[size]
    matmul = params_of(size, vocab_size, context) - context * p.n_embd
    return flops_per_token(matmul, p.n_layer, p.n_embd, context) * tokens
