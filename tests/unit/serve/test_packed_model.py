"""serve on a model whose layers are packed for the CPU (bf16 on a CPU with bf16 units): the LM head of its own is
a PackedLinear, without a `.weight`, and the server must still start and answer."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_the_server_starts_on_a_packed_model_with_its_own_head(small_tokenizer: Path, tmp_path: Path):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from gpt2_dutch.model.cpu_kernels import PackedLinear
    from gpt2_dutch.model.loading import load_model
    from gpt2_dutch.serve.app import Server

    tok = AutoTokenizer.from_pretrained(small_tokenizer)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                               tie_word_embeddings=False, bos_token_id=tok.eos_token_id,
                               eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tokenizer, model_dir = load_model(tmp_path, device="cpu", dtype="bf16")
    if not isinstance(model.get_output_embeddings(), PackedLinear):
        pytest.skip("this CPU has no oneDNN bf16 kernels: nothing is packed")
    server = Server(model, tokenizer, model_dir, "m", max_batch=2, max_queue=4)
    assert server.vocab == len(tok)
