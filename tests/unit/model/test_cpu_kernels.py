"""model/cpu_kernels.py: the CPU decode attention, the fused GELU and bf16 packing give the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DOCS

from gpt2_dutch.generate import GenerateConfig
from gpt2_dutch.generate.sampling import generate_texts
from gpt2_dutch.model.loading import load_model

# Every test here needs `tiny_run`, a model trained for 300 steps until it knows the corpus by heart (its
# continuations are asserted), which takes longer than the whole fast suite may; test_fault_matrix.py,
# on random models, is the fast part for generate and evaluate.
pytestmark = pytest.mark.slow


def test_cpu_decode_attention_equals_sdpa(loaded):
    """The one-query decoding path gives SDPA's result, padding mask included; longer queries are SDPA itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from gpt2_dutch.model.cpu_kernels import CPU_ATTENTION, cpu_decode_attention

    model = loaded[0]
    assert model.config._attn_implementation == CPU_ATTENTION
    module = model.transformer.h[0].attn
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 32), torch.randn(3, 4, 9, 32), torch.randn(3, 4, 9, 32)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :4] = False  # a left-padded row
    for m in (mask, None):
        ours, _ = cpu_decode_attention(module, q, k, v, m, scaling=0.125)
        ref, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.125)
        assert ours.shape == ref.shape == (3, 1, 4, 32) and torch.allclose(ours, ref, atol=1e-5)
    prompt = torch.randn(3, 4, 9, 32)
    ours, _ = cpu_decode_attention(module, prompt, k, v, None, scaling=0.125, is_causal=True)
    assert torch.equal(ours, sdpa_attention_forward(module, prompt, k, v, None, scaling=0.125, is_causal=True)[0])


def test_models_saved_with_gelu_new_load_with_the_fused_gelu_and_same_logits(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt2_dutch.model.presets import FAST_GELU

    final = tiny_run / "final_model"
    old = AutoModelForCausalLM.from_pretrained(str(final), activation_function="gelu_new").eval()
    old.save_pretrained(str(tmp_path))
    AutoTokenizer.from_pretrained(str(final)).save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu_new"
    model, tok, _ = load_model(tmp_path, device="cpu", dtype="fp32")
    assert model.config.activation_function == FAST_GELU
    ids = tok(["De trein naar Utrecht vertrekt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, old(ids).logits, atol=1e-5)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no oneDNN bf16")
def test_cpu_bf16_packs_every_linear_layer_with_the_same_logits(tiny_run):
    from transformers import AutoModelForCausalLM

    from gpt2_dutch.model.cpu_kernels import PackedLinear, parameter_count

    model, tok, _ = load_model(tiny_run, device="cpu", dtype="bf16")
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 4 * model.config.n_layer + 1  # attention in/out, MLP in/out per block + the LM head
    # an LM head tied to the token embedding is counted there, not again (train's default head is its own)
    assert [m.counted for m in packed].count(False) == int(model.config.tie_word_embeddings)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_run / "final_model"), dtype=torch.bfloat16).eval()
    assert parameter_count(model) == sum(p.numel() for p in plain.parameters())
    assert not any(isinstance(m, PackedLinear) for m in load_model(tiny_run, "cpu", "fp32")[0].modules())
    enc = tok([d[:25] for d in DOCS[:3]], return_tensors="pt", padding=True)  # within the 32-token context
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, plain(**enc).logits)


@pytest.mark.parametrize("failure", ["wrong results", "op error"])
def test_packing_that_fails_its_check_keeps_the_plain_model(tiny_run, monkeypatch, failure):
    from gpt2_dutch.model import cpu_kernels

    def broken(self, x):
        if failure == "op error":
            raise RuntimeError("mkldnn::_linear_pointwise: no such signature")
        return torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype)

    monkeypatch.setattr(cpu_kernels.PackedLinear, "forward", broken)
    model, tok, _ = load_model(tiny_run, device="cpu", dtype="bf16")
    assert not any(isinstance(m, cpu_kernels.PackedLinear) for m in model.modules())
    assert generate_texts(model, tok, ["De trein"], GenerateConfig(max_new_tokens=4, greedy=True))[0][0]
