"""GPT-2 model presets (GPT-2's own shapes plus `tiny`, `nano` and `pico`, which train on a laptop CPU in minutes),
the GPT2Config built from one, and the one FLOP-per-token count that budgets and benchmarks use.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt2_dutch.core.errors import UsageError


@dataclass(frozen=True)
class ModelPreset:
    n_layer: int
    n_embd: int
    n_head: int
    learning_rate: float  # peak LR; GPT-3 paper Table 2.1 for the GPT-2 shapes, higher for tiny (small models
    # tolerate and need larger steps)


MODEL_PRESETS: dict[str, ModelPreset] = {
    # pico: the smallest, what --model-size auto picks for minute-scale budgets. With a 32k vocabulary such a run
    # sees well under one token per parameter and learns mostly which token follows which; 2x64 did best of the
    # shapes tried at a 150 s budget (measured: docs/experiments/quality-rounds.md)
    "pico": ModelPreset(n_layer=2, n_embd=64, n_head=2, learning_rate=2e-3),
    # nano: for tests and a first try of the pipeline (tiny's shape until the quality work of #13)
    "nano": ModelPreset(n_layer=4, n_embd=128, n_head=4, learning_rate=2e-3),
    # tiny: 4x256 (the textbook small-GPT shape). With a 32k vocabulary most of a small model's FLOPs are in the
    # LM head either way, so twice the width costs less than twice per token; with Muon it learned more than 4x128
    # at the same few-minute budget (measured: docs/experiments/quality-rounds.md)
    "tiny": ModelPreset(n_layer=4, n_embd=256, n_head=4, learning_rate=2e-3),
    "small": ModelPreset(n_layer=12, n_embd=768, n_head=12, learning_rate=6e-4),
    "medium": ModelPreset(n_layer=24, n_embd=1024, n_head=16, learning_rate=3e-4),
    "large": ModelPreset(n_layer=36, n_embd=1280, n_head=20, learning_rate=2.5e-4),
    "xl": ModelPreset(n_layer=48, n_embd=1600, n_head=25, learning_rate=2e-4),
}


def preset(name: str) -> ModelPreset:
    if name not in MODEL_PRESETS:
        raise UsageError(f"unknown --model-size '{name}'; choose one of: {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]


FAST_GELU = "gelu_pytorch_tanh"


def gpt2_config(size: str, vocab_size: int, context: int, eos_token_id: int,
                tie_embeddings: bool = True):  # -> GPT2Config
    """A GPT2Config for `size` with the dataset's vocabulary and context; no dropout (single-pass pretraining).
    tie_embeddings=False gives the LM head its own weight (`train`'s default: see TrainConfig.tie_embeddings);
    either way it is a plain GPT2LMHeadModel."""
    from transformers import GPT2Config

    p = preset(size)
    return GPT2Config(
        vocab_size=vocab_size, n_positions=context, n_embd=p.n_embd, n_layer=p.n_layer, n_head=p.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        tie_word_embeddings=tie_embeddings,
        # GPT-2's own GELU (the tanh approximation), as one fused op instead of gelu_new's seven elementwise ones:
        # the same function, faster in training and decoding (measured: docs/experiments/throughput.md).
        activation_function=FAST_GELU,
    )


def flops_per_token(n_params: int, n_layer: int, n_embd: int, context: int) -> float:
    """Training FLOPs per token as in PaLM (appendix B) and nanoGPT: 6N for the weight matmuls (forward 2N,
    backward 4N) plus 12 * n_layer * n_embd * context for attention scores and values. N counts every parameter
    that takes part in a matmul: all but the position embeddings, and the token embedding once (tied, it is the
    LM head; untied, its lookup is no matmul and the head has its own weight)."""
    return 6 * n_params + 12 * n_layer * n_embd * context


def matmul_params(model) -> int:  # noqa: ANN001 - a GPT2LMHeadModel
    """Parameters that enter the FLOP count: everything except the position embedding table and, when the LM head
    has its own weight, the token embedding table (a lookup)."""
    tables = model.transformer.wpe.weight.numel()
    if model.get_output_embeddings().weight is not model.transformer.wte.weight:
        tables += model.transformer.wte.weight.numel()
    return sum(p.numel() for p in model.parameters()) - tables
