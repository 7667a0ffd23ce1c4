"""GPT-2 model presets (GPT-2's own shapes plus `tiny`, `nano` and `pico`, which train on a laptop CPU in minutes),
the GPT2Config built from one, the one FLOP-per-token count that budgets and benchmarks use, and memory: what a
model needs to train (`training_memory_bytes`), what the machine has free (`available_memory_bytes`), and the
one-line refusal when the one exceeds the other (`check_fits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# ---- memory: what a model needs, what the machine has, and the one-line refusal in between

@dataclass(frozen=True)
class ModelShape:
    """What decides a GPT-2's parameter count: a preset's layers and width, or a saved config's fields."""

    n_layer: int
    n_embd: int
    vocab_size: int
    context: int
    tie_embeddings: bool = False
    n_inner: int | None = None  # the MLP's width; None: 4 * n_embd, as GPT2Config

    @property
    def mlp(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def matrix_params(self) -> int:
        """The blocks' four weight matrices (attention c_attn and c_proj, MLP c_fc and c_proj): what Muon trains."""
        h = self.n_embd
        return self.n_layer * (3 * h * h + h * h + 2 * h * self.mlp)

    @property
    def params(self) -> int:
        """Every parameter of the GPT2LMHeadModel: equal to model.num_parameters() (tested)."""
        h = self.n_embd
        biases_and_norms = self.n_layer * (3 * h + h + self.mlp + h + 4 * h)  # 2 LayerNorms of 2h each
        tables = (self.vocab_size + self.context) * h + (0 if self.tie_embeddings else self.vocab_size * h)
        return self.matrix_params + biases_and_norms + tables + 2 * h  # + ln_f


def model_shape(model: str | ModelPreset | Any, vocab_size: int | None = None, context: int | None = None,
                tie_embeddings: bool = False) -> ModelShape:
    """A ModelShape from a preset name or ModelPreset (then vocab_size and context are needed), or from a
    GPT2Config-like object (n_layer, n_embd, vocab_size, n_positions, n_inner, tie_word_embeddings)."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str | ModelPreset):
        p = preset(model) if isinstance(model, str) else model
        if vocab_size is None or context is None:
            raise ValueError("a preset's shape needs vocab_size and context")  # a caller's bug
        return ModelShape(p.n_layer, p.n_embd, vocab_size, context, tie_embeddings)
    return ModelShape(model.n_layer, model.n_embd, model.vocab_size, model.n_positions,
                      bool(getattr(model, "tie_word_embeddings", True)), getattr(model, "n_inner", None))


BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}
# Activations stored for the backward pass, in elements per token and layer: the inputs of both LayerNorms and
# of the four matmuls (h, h, h, h), q, k, v and the attention output (4h, SDPA keeps no score matrix), the MLP's
# input and output of the GELU (4h + 4h)
ACTIVATIONS_PER_LAYER = 16


def training_memory(model: str | ModelPreset | Any, batch_tokens: int, optimizer: str = "adamw",
                    precision: str = "fp32", *, vocab_size: int | None = None, context: int | None = None,
                    tie_embeddings: bool = False, gradient_checkpointing: bool = False,
                    loss_chunk_tokens: int = 0) -> dict[str, int]:
    """Bytes one training process needs, by part; training_memory_bytes is their sum. See there."""
    s = model_shape(model, vocab_size, context, tie_embeddings)
    if optimizer not in ("adamw", "muon") or precision not in BYTES_PER_ELEMENT:
        raise ValueError(f"unknown optimizer {optimizer!r} or precision {precision!r}")  # a caller's bug
    p, a = s.params, BYTES_PER_ELEMENT[precision]
    states = 2 * p if optimizer == "adamw" else s.matrix_params + 2 * (p - s.matrix_params)
    per_token = s.n_layer * s.n_embd * 4 if gradient_checkpointing else \
        s.n_layer * s.n_embd * ACTIVATIONS_PER_LAYER * a
    if gradient_checkpointing:  # the layer being recomputed holds its full activations
        per_token += s.n_embd * ACTIVATIONS_PER_LAYER * a
    logit_rows = min(batch_tokens, loss_chunk_tokens) if loss_chunk_tokens else batch_tokens
    return {
        "weights": 4 * p + (2 * p if a == 2 else 0),  # fp32 weights; autocast caches a half copy of each
        "gradients": 4 * p,
        "optimizer": 4 * states,
        "activations": batch_tokens * (per_token + 4 * s.n_embd) + 2 * 4 * logit_rows * s.vocab_size,
    }


def training_memory_bytes(model: str | ModelPreset | Any, batch_tokens: int, optimizer: str = "adamw",
                          precision: str = "fp32", *, vocab_size: int | None = None, context: int | None = None,
                          tie_embeddings: bool = False, gradient_checkpointing: bool = False,
                          loss_chunk_tokens: int = 0) -> int:
    """Roughly the peak memory of one training process, in bytes, for a micro-batch of `batch_tokens` tokens.

    With P parameters (ModelShape.params), L layers, width h, vocabulary V and T = batch_tokens:
      weights 4P (fp32 master weights, as the Trainer keeps them; + 2P under bf16/fp16 autocast's weight copies),
      gradients 4P, optimizer state 8P for AdamW (two moments) or 4 x (matrices + 2 x the rest) for Muon
      (one momentum per block matrix, AdamW's two moments elsewhere),
      activations T x (16 L h x a + 4h), a = 2 bytes under bf16/fp16 and 4 in fp32 (with gradient checkpointing
      T x (4 L h + 16 h a): each layer's input plus one layer recomputed), plus the fp32 logits and their
      gradient, 8 x V x rows, rows = T or --loss-chunk-tokens.
    Not counted: the CUDA context, allocator fragmentation, DDP's gradient buckets, FSDP's sharding.
    """
    return sum(training_memory(model, batch_tokens, optimizer, precision, vocab_size=vocab_size, context=context,
                               tie_embeddings=tie_embeddings, gradient_checkpointing=gradient_checkpointing,
                               loss_chunk_tokens=loss_chunk_tokens).values())


def available_memory_bytes(device: Any = "cpu") -> int | None:
    """Memory this process could still allocate on `device`, in bytes, or None where it cannot be told.

    A CUDA device: its free memory (torch.cuda.mem_get_info). The CPU: MemAvailable (psutil where installed,
    else /proc/meminfo), and no more than the cgroup's limit less its usage where a container sets one.
    """
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    free = _host_available()
    limit = _cgroup_free()
    candidates = [x for x in (free, limit) if x is not None]
    return min(candidates) if candidates else None


def _host_available() -> int | None:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_free() -> int | None:
    """cgroup v2 (memory.max) or v1 (memory.limit_in_bytes): the limit less the usage, counting reclaimable page
    cache (inactive_file) as free, as the kernel does before it kills."""
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                                      "memory/memory.usage_in_bytes")):
        root = CGROUP_ROOT
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 1 << 60:  # "max", or v1's "no limit" (a page-rounded 2^63)
            return None
        cache = 0
        try:
            stat = (root / limit_file).with_name("memory.stat").read_text()
            cache = next((int(line.split()[1]) for line in stat.splitlines()
                          if line.split()[0] in ("inactive_file", "total_inactive_file")), 0)
        except (OSError, ValueError, IndexError):
            pass
        return max(0, int(limit) - usage + cache)
    return None


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # not reached


def check_fits(need: int, free: int | None, what: str, fix: str = "") -> None:
    """Refuse, in one line naming the need and what is free, what cannot fit; free None (unknown) passes.

    what: the subject of 'needs', e.g. "loading the model in M (124,439,808 parameters in fp32)"."""
    if free is None or need <= free:
        return
    raise UsageError(f"{what} needs about {format_bytes(need)} of memory, but only {format_bytes(free)} is free"
                     + (f"; {fix}" if fix else ""))
