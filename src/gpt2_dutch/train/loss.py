"""GPT-2's LM head and cross-entropy without the full `[tokens, vocab]` logits.

Why: with a 32,768-token vocabulary the LM head dominates small models, and the plain path
(`GPT2LMHeadModel(labels=...)`) materializes every position's logits in fp32 and keeps their log-softmax for
backward (1 GiB per micro-batch of 8 x 1024 tokens).

Here the loss is computed `chunk_tokens` rows of hidden states at a time: logits = h @ W^T in the compute
dtype, log-sum-exp and the target's logit in fp32, and, while the chunk's logits are at hand, their gradient
(softmax - one-hot, in place) with dL/dh for the chunk's rows and dL/dW accumulated in fp32. No chunk's logits
outlive its iteration (on a CPU they reuse one buffer: `logits_buffer`), nothing is recomputed in backward (the
plain path's 3 matmuls), and backward only scales the stored gradients by the incoming scalar.

Within a chunk the elementwise work runs ELEMENTWISE_LOGITS logits at a time (a block that stays in a CPU's
cache), with torch's fused softmax into a reused fp32 buffer; the loss is -log p(target) read off those
probabilities (see `chunk_loss` for rows where fp32 cannot hold p), and the gradient is one copy to `dtype` when
no row is ignored. Each of these choices was an A/B (docs/experiments/loss-kernels.md).

On CUDA a fused kernel from an installed library (Liger Kernel, then Apple's cut-cross-entropy) is used when
one imports; neither is a dependency. The model itself is never changed: the final model stays a plain
GPT2LMHeadModel (see GPT2Trainer.compute_loss for how the hidden states are obtained under DDP).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch

IGNORE_INDEX = -100  # what transformers' ForCausalLMLoss ignores; the Trainer counts labels != -100 as items
ELEMENTWISE_LOGITS = 1 << 21  # logits per elementwise block (8 MiB in fp32; see the module doc)


def compute_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives a matmul on `device` right now (None: autocast is off)."""
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


_cpu_buffers = threading.local()  # per thread: {(purpose, dtype): the largest buffer asked for so far}


def logits_buffer(rows: int, vocab: int, dtype: torch.dtype, device: torch.device,
                  purpose: str = "logits") -> torch.Tensor:
    """An uninitialised [rows, vocab] tensor for one chunk's logits. On a CPU it is a view of one buffer per
    thread and dtype, kept between chunks and calls: a chunk's logits (2,048 x 32,768 bf16 = 128 MiB) are
    above glibc's largest mmap threshold, so a fresh tensor per chunk is mapped and returned to the OS each time,
    and every page of it faults on first touch (measured in docs/experiments/loss-kernels.md). On GPUs the
    caching allocator already reuses memory: a plain tensor there."""
    if device.type != "cpu":
        return torch.empty(rows, vocab, dtype=dtype, device=device)
    buffers = getattr(_cpu_buffers, "by_key", None)
    if buffers is None:
        buffers = _cpu_buffers.by_key = {}
    buffer = buffers.get((purpose, dtype))
    if buffer is None or buffer.numel() < rows * vocab:
        buffer = buffers[(purpose, dtype)] = torch.empty(rows * vocab, dtype=dtype)
    return buffer[:rows * vocab].view(rows, vocab)


FP32_TINY = 1e-30  # below this a probability has lost precision in fp32 (normal numbers end at ~1.2e-38)


def chunk_loss(target_p: torch.Tensor, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed -log p(target) of a chunk's valid rows from the softmax's fp32 probabilities `target_p`; rows whose
    probability is below FP32_TINY get the exact value from their logits recomputed alone (h @ w^T in the
    chunk's dtype, as in the chunk; log-sum-exp in fp32). Such rows are rare (a confident model that is badly
    wrong), so the one check per chunk costs less than a log-sum-exp pass over every block."""
    valid = targets != IGNORE_INDEX
    tiny = valid & (target_p < FP32_TINY)
    loss = torch.where(valid & ~tiny, -target_p.clamp(min=FP32_TINY).log(), 0.0).sum()
    if bool(tiny.any()):
        logits = (h[tiny] @ w.t()).float()
        loss = loss + (logits.logsumexp(dim=1) - logits.gather(1, targets[tiny].unsqueeze(1)).squeeze(1)).sum()
    return loss


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight^T, targets), `chunk` rows at a time; see the module doc."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype, block_logits: int) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # autocast off: every dtype below is chosen explicitly (matmuls in `dtype`, softmax in fp32)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(h) if want_h else None
            # fp32 across chunks: summing per-chunk bf16 products in bf16 would lose the small ones
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
            block = max(1, block_logits // w.shape[0])  # rows per elementwise block
            for start in range(0, h.shape[0], chunk):
                hc, tc = h[start:start + chunk], targets[start:start + chunk]
                logits = logits_buffer(hc.shape[0], w.shape[0], dtype, h.device)
                target_p = torch.empty(hc.shape[0], dtype=torch.float32, device=h.device)
                torch.matmul(hc, w.t(), out=logits)  # in `dtype`; overwritten block by block with dL/dlogits
                for row in range(0, logits.shape[0], block):
                    out = logits[row:row + block]
                    t = tc[row:row + block]
                    valid = t != IGNORE_INDEX
                    safe = torch.where(valid, t, 0).unsqueeze(1)
                    # one fused kernel for the softmax: each row goes through the cache once, where max, exp-sum
                    # and scale as separate ops each passed over the whole block (see the module doc)
                    probs = torch.softmax(out, dim=1, dtype=torch.float32,
                                          out=logits_buffer(*out.shape, torch.float32, h.device, "probs"))
                    # the loss is -log p_target, read off the softmax: no further pass over the block (the
                    # log-sum-exp's two maxima took ~6% of a pico step). Where p_target is too small for fp32
                    # (< FP32_TINY: more than ~69 nats below the best logit), the loss is recomputed exactly below
                    target_p[row:row + block] = probs.gather(1, safe).squeeze(1)
                    if not (want_h or want_w):
                        continue  # evaluation: the loss is all
                    # dL/dlogits = softmax - one_hot, rounded to `dtype` once (as the plain path, which rounds the
                    # fp32 gradient); ignored rows get a zero scale: no gradient
                    keep = valid.unsqueeze(1).to(torch.float32)
                    probs.scatter_add_(1, safe, -keep)
                    if bool(valid.all()):
                        out.copy_(probs)
                    else:
                        torch.mul(probs, keep, out=out)
                total += chunk_loss(target_p, hc, w, tc)
                if not (want_h or want_w):
                    continue
                if grad_h is not None:  # `logits` now holds dL/dlogits
                    torch.matmul(logits, w, out=grad_h[start:start + chunk])
                if grad_w is not None:
                    if dtype == torch.float32:
                        grad_w.addmm_(logits.t(), hc)
                    else:
                        grad_w += (logits.t() @ hc).float()
                del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        dh = None if grad_h is None else (grad_h * grad_out).to(h_dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        return dh, dw, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk_tokens: int, block_logits: int = ELEMENTWISE_LOGITS) -> torch.Tensor:
    """The summed (fp32) cross-entropy of `hidden [N, C] @ weight[V, C]^T` against `targets [N]` (-100:
    ignored), `chunk_tokens` rows at a time (the elementwise work `block_logits` logits at a time); matmuls in
    the autocast dtype if autocast is on."""
    dtype = compute_dtype(hidden.device) or hidden.dtype
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, max(1, chunk_tokens), dtype, block_logits)


@functools.cache
def fused_cuda_loss() -> tuple[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] | None:
    """(name, fn(hidden, weight, targets) -> summed loss) from an installed fused linear-cross-entropy library,
    or None. Imported lazily and only for CUDA tensors: neither library is a dependency (both need Triton)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
        return "liger_kernel", lambda h, w, t: liger(w, h, t)
    except Exception:  # noqa: BLE001 - not installed, or broken against this torch: the chunked path instead
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        return "cut_cross_entropy", lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX,
                                                                         reduction="sum")
    except Exception:  # noqa: BLE001 - as above
        return None


def lm_head_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     chunk_tokens: int) -> torch.Tensor:
    """Summed next-token cross-entropy of GPT-2's head: position i predicts labels[:, i + 1], as
    GPT2LMHeadModel's own loss (labels shifted inside; the last position predicts nothing).

    hidden: [batch, seq, C] (after ln_f); weight: the head's [vocab, C] (its own, or the tied token embedding)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    t = labels[:, 1:].reshape(-1).to(hidden.device)
    if hidden.is_cuda:
        fused = fused_cuda_loss()
        if fused is not None:
            # the kernels want one dtype for both operands: the autocast dtype, as the plain path's lm_head
            dtype = compute_dtype(hidden.device) or hidden.dtype
            return fused[1](h.to(dtype), weight.to(dtype), t).float()
    return chunked_linear_cross_entropy(h, weight, t, chunk_tokens)
