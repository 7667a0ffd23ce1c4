"""CPU inference kernels for GPT-2 decoding, each checked against PyTorch's plain path before it is used.

`model.loading.load_model` applies them on CPU only (generate, evaluate, serve, bench); training never sees them.
"""

from __future__ import annotations

from typing import Any

import torch

CPU_ATTENTION = "gpt2_dutch_cpu_decode"


def cpu_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA for the prompt, plain matmul + softmax for the one-token decoding steps on CPU.

    Why: for a single query PyTorch's CPU flash-attention kernel costs more than the attention maths itself
    (measured: docs/experiments/throughput.md). The mask is SDPA's boolean one.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2), None


def _use_cpu_decode_attention(model: Any) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CPU_ATTENTION, cpu_decode_attention)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)
    model.set_attn_implementation(CPU_ATTENTION)


class PackedLinear(torch.nn.Module):
    """An inference-only linear layer whose bf16 weight is prepacked once into oneDNN's blocked layout.

    Why: for the few-row matmuls of decoding, PyTorch's bf16 addmm re-lays-out the weight on every call; the
    prepacked kernel (the one torch.compile's weight freezing uses) streams the weights faster with bit-identical
    results (measured: docs/experiments/throughput.md). The packed weight is not a parameter: a model with
    packed layers is for generation and evaluation, not for training or saving.

    The oneDNN ops are private (`torch.ops.mkldnn._*`): PyTorch has no public prepacked linear outside
    torch.compile. An upstream change makes `pack_cpu_linears` keep the plain model, and fails
    tests/unit/model/test_cpu_kernels.py::test_cpu_bf16_packs_every_linear_layer_with_the_same_logits.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, counted: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        self.counted = counted  # False for a tied LM head: its weight is the token embedding, counted there

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_cpu_linears(model: Any) -> int:
    """Swap a CPU bf16 model's linear layers (GPT-2's Conv1D, nn.Linear) for PackedLinear; returns how many.

    Leaves the model as it is where oneDNN has no bf16 support, where the ops fail, or where a packed layer does
    not reproduce the plain one on a test input.
    """
    from transformers.pytorch_utils import Conv1D

    if not (hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return 0
    swaps: list[tuple[torch.nn.Module, str, PackedLinear]] = []
    embedding = model.get_input_embeddings().weight.data_ptr()
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Conv1D):  # GPT-2 stores x @ W as an [in, out] weight
                weight, bias = child.weight.t(), child.bias
            elif type(child) is torch.nn.Linear:
                weight, bias = child.weight, child.bias
            else:
                continue
            if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
                continue
            # A private generator: loading a model must not move the global RNG that --seed sets.
            x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).bfloat16()
            try:  # private PyTorch ops (see PackedLinear): a version that changed them keeps the plain model
                packed = PackedLinear(weight, bias, counted=weight.data_ptr() != embedding)
                with torch.no_grad():
                    same = torch.allclose(packed(x).float(), child(x).float(), rtol=1e-2, atol=1e-2)
            except (RuntimeError, TypeError):
                return 0
            if not same:
                return 0
            swaps.append((parent, name, packed))
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    return len(swaps)


def parameter_count(model: Any) -> int:
    """The model's parameters, packed layers included."""
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear) and m.counted)
    return sum(p.numel() for p in model.parameters()) + packed
