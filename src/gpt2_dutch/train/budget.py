"""Budget-aware defaults for runs given a budget (`--max-time` or `--max-tokens`).

    gpt2-dutch train --dataset-path D --model-size auto --max-time 30m   # the preset that suits 30 minutes here
    gpt2-dutch train --dataset-path D --model-size tiny --max-time 4m    # tokens per step chosen for 4 minutes

Two choices, both from the compute C = training FLOPs of the run (flops_per_token x tokens), and both only where
the user did not decide (an explicit --model-size / --batch-size always wins):

- `--model-size auto`: the GPT-2 preset closest to compute-optimal, i.e. to ~20 training tokens per parameter
  (Hoffmann et al. 2022, "Chinchilla"), compared on a log scale. With --max-tokens the tokens are known; with
  --max-time they come from the tokens/s measured here: each preset, smallest first, trains two micro-batches
  on random tokens (after one that warms up) until one would see fewer than 20 tokens per parameter, since every
  larger one sees fewer still; each also times one step of the run's optimizer (after one that allocates its
  state). The seconds spent measuring are taken from the budget.
- tokens per step, when --batch-size is not given: DeepSeek LLM's fit of the best batch size to compute,
  B = 0.292 * C^0.3271 tokens (Bi et al. 2024, eq. 1; fitted from 1e17 to 3e20 FLOPs), but no more than leaves
  the run MIN_STEPS steps, in whole chunks; beyond MICRO_BATCH chunks per device the rest comes from gradient
  accumulation. Short runs get small steps and so more of them: for a short budget, steps matter more than
  tokens per step. With --max-time, a step costs its tokens at the measured forward + backward speed plus the
  optimizer's step, a fixed cost whatever the step's tokens (Muon's Newton-Schulz iterations): the steps and
  tokens in the budget are counted with it, and tokens per step are raised until the optimizer takes at most
  MAX_OPTIMIZER_SHARE of a step. Where that leaves fewer than MIN_STEPS steps, the optimizer's share wins
  (see choose_batch_in_time).
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
from typing import Any

from gpt2_dutch.core.errors import UsageError, check
from gpt2_dutch.model.presets import MODEL_PRESETS

TOKENS_PER_PARAM = 20  # Chinchilla's compute-optimal ratio
MICRO_BATCH = 8  # chunks per device per forward when the batch is chosen here (the old default --batch-size)
DEFAULT_BATCH = 8  # --batch-size of a run without a budget
# The fit below comes from runs of 1e17+ FLOPs with thousands of steps; extrapolated to a few minutes on a CPU
# (1e13) it leaves a run ~20 steps, and there fewer tokens per step won clearly. So a run gets at least this many
# steps; 150 and not 100 because the speed probe then left out the optimizer and the data, so runs planned for 100
# got fewer, and fewer than ~100 cost quality (docs/experiments/budget.md).
MIN_STEPS = 150
# A --max-time run's optimizer takes at most this share of a step: its cost is per step, so below this many
# tokens per step the budget goes to orthogonalising updates rather than to reading tokens (issue #29).
MAX_OPTIMIZER_SHARE = 0.25


def optimal_tokens_per_step(train_flops: float) -> float:
    """DeepSeek LLM (Bi et al. 2024), eq. 1: B_opt = 0.292 * C^0.3271 tokens per step."""
    return 0.292 * train_flops ** 0.3271


@dataclass
class Batch:
    batch_size: int  # chunks per device per micro-batch
    accumulation: int  # micro-batches per step
    reason: str
    tokens: float = math.inf  # the tokens the run sees in its budget at this step (choose_batch_in_time)
    optimizer_share: float | None = None  # of a step's seconds, where the optimizer's cost was measured


@dataclass(frozen=True)
class StepCost:
    """What an optimizer step costs here: its tokens at `tokens_per_s` (forward + backward, all ranks together)
    plus `optimizer_s`, the optimizer's fixed seconds per step (gradient clipping included)."""

    tokens_per_s: float
    optimizer_s: float

    def step_s(self, tokens_per_step: float) -> float:
        return tokens_per_step / self.tokens_per_s + self.optimizer_s

    def tokens_in(self, seconds: float, tokens_per_step: float) -> float:
        """Tokens trained in `seconds` at `tokens_per_step` (fractional steps: an estimate)."""
        return seconds / self.step_s(tokens_per_step) * tokens_per_step

    def optimizer_share(self, tokens_per_step: float) -> float:
        return self.optimizer_s / self.step_s(tokens_per_step)


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


def choose_batch_in_time(flops_per_token: float, budget_s: float, cost: StepCost, max_tokens: float | None,
                         context: int, world: int, accumulation: int | None) -> Batch:
    """Chunks per micro-batch and micro-batches per step for a run of `budget_s` seconds (and at most
    `max_tokens`) whose steps cost `cost`: as choose_batch, with the steps and tokens counted at that cost, and
    tokens per step raised until the optimizer takes at most MAX_OPTIMIZER_SHARE of a step.

    Where MIN_STEPS steps would leave the optimizer more than that share, the share wins: MIN_STEPS was measured
    where the optimizer cost little, so that more steps cost no tokens; here every step it adds costs tokens the
    run never sees (the reason says how many)."""
    cap = max_tokens or math.inf

    def tokens_at(per_step: float) -> float:
        return min(cost.tokens_in(budget_s, per_step), cap)

    # the largest step that leaves MIN_STEPS: budget_s / step_s(b) >= MIN_STEPS and cap / b >= MIN_STEPS
    steps_cap = min(cost.tokens_per_s * (budget_s / MIN_STEPS - cost.optimizer_s), cap / MIN_STEPS)
    share_floor = cost.tokens_per_s * cost.optimizer_s * (1 - MAX_OPTIMIZER_SHARE) / MAX_OPTIMIZER_SHARE
    # the fit depends on the run's tokens, which depend on the step (the optimizer's cost is per step): a few
    # rounds of the fixed point, which moves by the fit's 0.33 power of the tokens
    fit = optimal_tokens_per_step(flops_per_token * tokens_at(max(steps_cap, context)))
    for _ in range(4):
        fit = optimal_tokens_per_step(flops_per_token * tokens_at(max(min(fit, steps_cap), context)))
    target = min(fit, steps_cap)
    raised = target < share_floor
    if raised:
        target = share_floor
    chunks = target / (context * world)
    per_device = max(1, math.ceil(chunks - 1e-9) if raised else round(chunks))
    if accumulation is None:
        accumulation = math.ceil(per_device / MICRO_BATCH)
    batch = max(1, math.ceil(per_device / accumulation))
    per_step = batch * accumulation * world * context
    tokens, share = tokens_at(per_step), cost.optimizer_share(per_step)
    optimizer = f"the optimizer's step, {cost.optimizer_s:.2g} s, takes {share:.0%} of a step"
    if not raised:
        why = (f"DeepSeek LLM's fit: {fit:,.0f}" if target == fit else
               f"at least {MIN_STEPS} steps in {budget_s:.0f} s; DeepSeek LLM's fit would be {fit:,.0f}")
        why += f"; {optimizer}"
    else:
        why = f"raised so that {optimizer} (at most {MAX_OPTIMIZER_SHARE:.0%}: its cost is per step)"
        if steps_cap < per_step:  # MIN_STEPS and the share cannot both hold
            fewer = max(context * world, steps_cap)  # the step MIN_STEPS would allow, at least one chunk
            allow = (f"would allow {steps_cap:,.0f} tokens per step" if steps_cap >= context * world else
                     "do not fit even at one chunk a step")
            why += (f"; at least {MIN_STEPS} steps {allow}, where it would take {cost.optimizer_share(fewer):.0%} "
                    f"and the run see {tokens / tokens_at(fewer):.1f}x fewer tokens: the optimizer's share wins")
        else:
            why += f"; DeepSeek LLM's fit would be {fit:,.0f}"
    return Batch(batch, accumulation, f"{per_step:,} tokens per step, {tokens:.3g} tokens for a run of "
                 f"{flops_per_token * tokens:.2g} FLOPs ({why})", tokens=tokens, optimizer_share=share)


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
    optimizer_s: float = 0.0  # seconds per optimizer step measured for the chosen size (0: not measured)


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
                      tie_embeddings: bool = True, optimizer: str = "muon") -> SizeChoice:
    """The preset for --model-size auto (see the module doc); `optimizer`: the one the run trains with, whose
    step the speed probe times."""
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
    cost: dict[str, StepCost] = {}
    for size in sizes:
        probe = (size, vocab_size, context, eos_token_id, precision, loss_chunk_tokens)
        speed = world * measure_tokens_per_s(*probe, tie_embeddings=tie_embeddings, optimizer=optimizer)
        cost[size] = StepCost(speed, measure_optimizer_step_s(*probe, tie_embeddings=tie_embeddings,
                                                              optimizer=optimizer))
        # the tokens at the step the batch rule would choose for this size (the optimizer's cost is per step)
        tokens[size] = choose_batch_in_time(train_flops(size, vocab_size, context, 1.0), budget_s, cost[size],
                                            max_tokens, context, world, None).tokens
        if ratio(size, tokens[size]) < TOKENS_PER_PARAM:
            break  # larger presets would see fewer tokens per parameter still
    probe_s = time.perf_counter() - start
    chosen = closest(tokens)
    measured = ", ".join(f"{s} {c.tokens_per_s:,.0f} + {c.optimizer_s:.2g} s" for s, c in cost.items())
    return SizeChoice(chosen, cost[chosen].tokens_per_s, probe_s, f"about {tokens[chosen]:.3g} tokens in the budget "
                      f"at the measured speeds (forward + backward tokens/s + {optimizer}'s seconds per step: "
                      f"{measured}): {ratio(chosen, tokens[chosen]):.3g} tokens per parameter, the closest to "
                      f"compute-optimal (~{TOKENS_PER_PARAM})", optimizer_s=cost[chosen].optimizer_s)


# the optimizer seconds of the newest probe, until measure_optimizer_step_s takes them: one probe (one model
# built) gives both figures
_PROBED_OPTIMIZER_S: dict[tuple[Any, ...], float] = {}


def measure_tokens_per_s(size: str, vocab_size: int, context: int, eos_token_id: int, precision: str,
                         loss_chunk_tokens: int, chunks: int | None = None, tie_embeddings: bool = True,
                         optimizer: str | None = None) -> float:
    """Training tokens/s of a preset's forward + backward on this device (see _probe). With `optimizer`, the same
    probe times that optimizer's step too, which measure_optimizer_step_s with the same arguments then returns
    without measuring again."""
    key = (size, vocab_size, context, eos_token_id, precision, loss_chunk_tokens, chunks, tie_embeddings, optimizer)
    speed, optimizer_s = _probe(*key)
    _PROBED_OPTIMIZER_S.clear()
    if optimizer is not None:
        _PROBED_OPTIMIZER_S[key] = optimizer_s
    return speed


def measure_optimizer_step_s(size: str, vocab_size: int, context: int, eos_token_id: int, precision: str,
                             loss_chunk_tokens: int, chunks: int | None = None, tie_embeddings: bool = True,
                             optimizer: str = "muon") -> float:
    """Seconds of one step of `optimizer` ("muon" or "adamw", built as the run builds it) for a preset on this
    device, gradient clipping included: the fixed cost of every optimizer step, whatever its tokens."""
    key = (size, vocab_size, context, eos_token_id, precision, loss_chunk_tokens, chunks, tie_embeddings, optimizer)
    if key in _PROBED_OPTIMIZER_S:
        return _PROBED_OPTIMIZER_S.pop(key)
    return _probe(*key)[1]


def probe_optimizer(model: Any, optimizer: str, precision: str) -> Any:
    """The optimizer a run of `optimizer` builds for `model` (train/trainer.py: MuonAdamW with a bf16 run's
    Newton-Schulz in bf16; AdamW as the Trainer's adamw_torch, fused on CUDA), at the defaults' settings:
    learning rates, betas and decay change no step's cost."""
    import torch

    from gpt2_dutch.train.config import ADAM_BETAS
    from gpt2_dutch.train.muon import MuonAdamW, param_groups

    if optimizer == "muon":
        return MuonAdamW(param_groups(model, 1e-3, 0.1, betas=ADAM_BETAS["muon"]),
                         ns_dtype=torch.bfloat16 if precision == "bf16" else None)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-3, betas=ADAM_BETAS["adamw"], fused=True if torch.cuda.is_available() else None)


def _probe(size: str, vocab_size: int, context: int, eos_token_id: int, precision: str, loss_chunk_tokens: int,
           chunks: int | None, tie_embeddings: bool, optimizer: str | None) -> tuple[float, float]:
    """(tokens/s of forward + backward, seconds of an optimizer step) of a micro-batch of random tokens, in the
    run's precision and loss path: forward + backward three times, the faster of the last two (the first warms
    up: allocations, kernel selection); with `optimizer`, its step (clipping first, as the Trainer does) after the
    first two, the second timed (the first allocates its state). 0.0 seconds without one. Global RNG state is
    untouched."""
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
    opt = probe_optimizer(model, optimizer, precision) if optimizer else None

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    try:
        times, optimizer_times = [], []
        for i in range(3):
            t = clock()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                if loss_chunk_tokens:
                    out = model(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
                    loss = lm_head_loss_sum(out.hidden_states[-1], model.get_output_embeddings().weight, ids,
                                            loss_chunk_tokens)
                else:
                    loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            times.append(clock() - t)
            if opt is not None and i < 2:
                t = clock()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                optimizer_times.append(clock() - t)
            model.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        raise UsageError(f"--model-size auto: {size} does not fit this device's memory at {chunks} chunks of "
                         f"{context}; pick a --model-size") from None
    finally:
        del model, opt
    return chunks * context / min(times[1:]), optimizer_times[-1] if optimizer_times else 0.0


def train_flops(size: str, vocab_size: int, context: int, tokens: float) -> float:
    """Training FLOPs of `tokens` tokens for a preset (model.flops_per_token; position embeddings take no part)."""
    from gpt2_dutch.model.presets import flops_per_token

    p = MODEL_PRESETS[size]
    matmul = params_of(size, vocab_size, context) - context * p.n_embd
    return flops_per_token(matmul, p.n_layer, p.n_embd, context) * tokens
