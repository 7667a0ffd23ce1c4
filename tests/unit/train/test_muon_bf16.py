"""Muon's Newton-Schulz in bf16 (a bf16 run on a CPU with bf16 matmul units): fp32's update to a stated tolerance."""

from __future__ import annotations

import torch

from gpt2_dutch.train.muon import MuonAdamW, newton_schulz, param_groups


def _model(n_layer: int = 3, n_embd: int = 48):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=97, n_positions=16,
                                       tie_word_embeddings=False))
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():  # the same gradients in every copy made by calling this again
        p.grad = torch.randn(p.shape, generator=generator)
    return model


def test_bf16_newton_schulz_is_fp32s_to_a_few_percent():
    """bf16 keeps 8 bits of mantissa: over five iterations the update moves by a few percent of its norm (a cosine
    above 0.998 with fp32's), and its singular values stay in the band the quintic aims for."""
    torch.manual_seed(2)
    g = torch.randn(8, 64, 256)
    full, half = newton_schulz(g, dtype=torch.float32), newton_schulz(g, dtype=torch.bfloat16).float()
    relative = ((half - full).norm(dim=(-2, -1)) / full.norm(dim=(-2, -1))).max().item()
    assert relative < 0.06
    s = torch.linalg.svdvals(half)
    assert s.min() > 0.5 and s.max() < 1.3


def test_a_bf16_optimizer_steps_in_bf16_and_stays_close_to_fp32():
    model, half = _model(1, 256), _model(1, 256)  # a width where a CPU iterates in bf16 (CPU_BF16_NS_MIN_SIDE)
    MuonAdamW(param_groups(model, 1e-3, 0.1), ns_dtype=torch.float32).step()
    MuonAdamW(param_groups(half, 1e-3, 0.1), ns_dtype=torch.bfloat16).step()
    w, h = model.transformer.h[0].mlp.c_fc.weight, half.transformer.h[0].mlp.c_fc.weight
    assert h.dtype == torch.float32  # the weights keep their dtype; only the iteration ran in bf16
    start = _model(1, 256).transformer.h[0].mlp.c_fc.weight
    step_full, step_half = w - start, h - start
    assert 0 < (step_half - step_full).norm() / step_full.norm() < 0.06


def test_on_a_cpu_small_matrices_iterate_in_fp32_and_large_ones_in_bf16(monkeypatch):
    import gpt2_dutch.train.muon as muon

    seen = []
    real = muon.newton_schulz
    monkeypatch.setattr(muon, "newton_schulz",
                        lambda g, dtype=None, **kw: seen.append(dtype) or real(g, dtype=dtype, **kw))
    side = muon.CPU_BF16_NS_MIN_SIDE
    muon.orthogonal_update(torch.randn(side // 2, 2 * side), True, 1, torch.bfloat16)
    muon.orthogonal_update(torch.randn(side, 3 * side), True, 3, torch.bfloat16)  # three blocks of side x side
    muon.orthogonal_update(torch.randn(side, 4 * side), True, 1, torch.float32)
    assert seen == [torch.float32, torch.bfloat16, torch.float32]
