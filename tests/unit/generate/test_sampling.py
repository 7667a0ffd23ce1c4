"""generate/sampling.py on a tiny model that has memorised the test documents: seeded sampling, batches equal one by
one, end of text, each prompt's own budget."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import DOCS

from gpt2_dutch.generate import GenerateConfig
from gpt2_dutch.generate.sampling import generate_texts
from gpt2_dutch.model.loading import load_model

# Every test here needs `tiny_run`, a model trained for 300 steps until it knows the corpus by heart (its
# continuations are asserted), which takes longer than the whole fast suite may; test_fault_matrix.py,
# on random models, is the fast part for generate and evaluate.
pytestmark = pytest.mark.slow


def test_seeded_sampling_is_reproducible(loaded):
    model, tok, _ = loaded
    cfg = GenerateConfig(max_new_tokens=12, seed=7, temperature=1.5, top_k=0, top_p=1.0)
    a = generate_texts(model, tok, ["De trein"], cfg)
    b = generate_texts(model, tok, ["De trein"], cfg)
    assert a == b
    cfg.seed, cfg.temperature = 8, 5.0  # another seed, nearly uniform: 12 tokens never come out the same (at 1.5
    # this tiny model, which knows its 12 training sentences by heart, drew the same text with seeds 7 and 8)
    assert generate_texts(model, tok, ["De trein"], cfg) != generate_texts(model, tok, ["De trein"],
                                                                           replace(cfg, seed=7))
    cfg.num_return_sequences = 3
    cfg.seed = 7
    many = generate_texts(model, tok, ["De trein", "Het"], cfg)
    assert [len(x) for x in many] == [3, 3]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_greedy_batch_equals_one_by_one(tiny_run, dtype):
    model, tok, _ = load_model(tiny_run, device="cpu", dtype=dtype)
    cfg = GenerateConfig(max_new_tokens=12, greedy=True)
    prompts = ["De trein naar", "Oma bakt elke", "Het", "Kinderen leren op school"]  # all fit 12 new tokens
    batch = generate_texts(model, tok, prompts, cfg)
    single = [generate_texts(model, tok, [p], cfg)[0] for p in prompts]
    assert batch == single


def test_generation_stops_at_end_of_text(loaded):
    model, tok, _ = loaded
    doc = DOCS[10]  # memorised: greedy decoding finishes the document and then emits <|endoftext|>
    prompt = "Rembrandt en"
    ids = tok(prompt, return_tensors="pt")
    room = 32 - ids["input_ids"].shape[1]
    cfg = GenerateConfig(max_new_tokens=room, greedy=True)
    completion = generate_texts(model, tok, [prompt], cfg)[0][0]
    assert doc.endswith(prompt + completion) and completion == " Van Gogh."
    out = model.generate(**ids, max_new_tokens=room, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    assert out[0, -1].item() == tok.eos_token_id and out.shape[1] < 32


def test_each_prompt_gets_its_own_budget_in_a_batch(loaded, monkeypatch):
    """A long prompt no longer shortens the others: before, every prompt got context minus the longest prompt."""
    from gpt2_dutch.generate.sampling import plan_prompts

    model, tok, _ = loaded
    short, long = "De trein naar", DOCS[0][:33]  # the long one leaves fewer than 12 of the 32 positions
    n_long = len(tok(long)["input_ids"])
    assert 32 - n_long < 12
    cfg = GenerateConfig(max_new_tokens=12, greedy=True)
    plans = plan_prompts(tok, [short, long], 32, 12)
    assert [p.max_new_tokens for p in plans] == [12, 32 - n_long] and [p.dropped for p in plans] == [0, 0]
    calls = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw["max_new_tokens"]) or original(**kw))
    batch = generate_texts(model, tok, [short, long, "Oma bakt elke"], cfg)
    assert sorted(calls) == [32 - n_long, 12]  # the capped prompt runs apart; the two that fit share one batch
    assert batch[0] == generate_texts(model, tok, [short], cfg)[0] == [" Utrecht vertrekt"]
    assert len(tok(batch[0][0])["input_ids"]) == 12  # 12 new tokens, not the long prompt's 32 - n_long
    assert batch[1] == generate_texts(model, tok, [long], cfg)[0]
    assert long + batch[1][0] == DOCS[0][:len(long + batch[1][0])]  # memorised: its capped continuation
    calls.clear()
    generate_texts(model, tok, [short, "Oma bakt elke", "Het"], cfg)
    assert calls == [12]  # the common case, every prompt fits: one batch
