"""The batch encoder: tiktoken gives exactly the ids of `tokenizers`, or it is not used."""

from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import pytest
from conftest import DOCS, DUTCH_CORPUS
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from gpt2_dutch.tokenizer import EOS_TOKEN, BatchEncoder, load_tokenizer, train_bpe

# Texts that stress the pre-tokenizer and the byte-level alphabet, written for this test.
HARD_TEXTS = [
    "Hello world",
    "Zo'n 3,14 procent van de 1.000.000 inwoners zei: \u201cDat is 't ergste!\u201d",
    "Hij's er niet; we'll see, I'd've thought, they're here, you've, I'm, she'd",
    "tabs\tand\u00a0non-breaking\u2009thin\u3000ideographic spaces   ,\n\n\n  trailing   ",
    "emoji \U0001f389\U0001f1f3\U0001f1f1 and \u65e5\u672c\u8a9e and \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "combining e\u0301 vs \u00e9, ligature \ufb01, zero\u200bwidth, control \x01\x7f bytes",
    f"two documents{EOS_TOKEN}in one string, and {EOS_TOKEN}{EOS_TOKEN} twice",
    "a" * 3000 + " " + "ab" * 1500,
    " " * 50 + "x",
    "\r\n\r\n",
    "",
]


def reference_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def test_fast_encoder_gives_the_ids_of_tokenizers_for_a_trained_bpe(small_tokenizer):
    tok = load_tokenizer(str(small_tokenizer))
    encode = BatchEncoder(tok, threads=2)
    assert encode.name == "tiktoken"
    texts = HARD_TEXTS + DOCS
    assert encode(texts) == reference_ids(tok, texts)
    eos = tok.eos_token_id
    assert encode([EOS_TOKEN]) == [[eos]]


def test_fast_encoder_gives_gpt2_ids_for_the_english_gpt2_bpe(gpt2_dir):
    tok = load_tokenizer(str(gpt2_dir))
    encode = BatchEncoder(tok, threads=2)
    assert encode.name == "tiktoken"
    assert encode(["Hello world", f"Hello{EOS_TOKEN}"]) == [[15496, 995], [15496, 50256]]
    assert encode(HARD_TEXTS + DOCS) == reference_ids(tok, HARD_TEXTS + DOCS)


def test_encoder_tokenizers_is_never_tiktoken(small_tokenizer):
    tok = load_tokenizer(str(small_tokenizer))
    encode = BatchEncoder(tok, threads=1, engine="tokenizers")
    assert encode.name == "tokenizers" and encode(DOCS) == reference_ids(tok, DOCS)


@pytest.mark.parametrize("engine", ["auto", "tokenizers"])
def test_truncation_or_padding_saved_in_a_tokenizer_never_cuts_documents(small_tokenizer, engine):
    tok = load_tokenizer(str(small_tokenizer))
    full = reference_ids(tok, DOCS[:2])
    tok.backend_tokenizer.enable_truncation(max_length=4)
    tok.backend_tokenizer.enable_padding(length=200)
    encode = BatchEncoder(tok, threads=1, engine=engine)
    assert encode(DOCS[:2]) == full and all(len(ids) > 4 for ids in full)
    assert tok.backend_tokenizer.truncation["max_length"] == 4  # the caller's tokenizer is left as it was


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], **byte_level) -> SimpleNamespace:
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(**{"add_prefix_space": False, **byte_level})
    tok.decoder = decoders.ByteLevel()
    return SimpleNamespace(backend_tokenizer=tok)  # all BatchEncoder reads of a transformers tokenizer


def _alphabet_vocab() -> dict[str, int]:
    return {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}


def test_a_bpe_in_merge_order_is_accepted():
    vocab = _alphabet_vocab()
    vocab.update({"ab": 256, "abc": 257})
    tok = _bpe(vocab, [("a", "b"), ("ab", "c")])
    encode = BatchEncoder(tok, threads=1)
    assert encode.name == "tiktoken"
    assert encode(["abc ab"]) == reference_ids(tok, ["abc ab"]) == [[257, vocab["Ġ"], 256]]


@pytest.mark.parametrize("change", ["ids out of merge order", "normalizer", "prefix space", "extra token",
                                    "non-special added token"])
def test_tokenizers_tiktoken_cannot_match_stay_on_tokenizers(change):
    vocab = _alphabet_vocab()
    # "bc" merges before "ab" but gets the higher id: tiktoken would merge a+b first and split "abc" otherwise.
    merges = [("b", "c"), ("a", "b")]
    vocab.update({"bc": 256, "ab": 257} if change != "ids out of merge order" else {"bc": 257, "ab": 256})
    if change == "extra token":
        vocab["abc"] = 258  # in the vocabulary but made by no merge: tokenizers never produces it
    tok = _bpe(vocab, merges, add_prefix_space=change == "prefix space")
    if change == "normalizer":
        tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    if change == "non-special added token":
        tok.backend_tokenizer.add_tokens(["xyz"])
    encode = BatchEncoder(tok, threads=1)
    assert encode.name == "tokenizers"
    assert encode(["abc Abc xyz"]) == reference_ids(tok, ["abc Abc xyz"])


def test_a_disagreement_on_the_first_documents_switches_to_tokenizers(small_tokenizer, capsys):
    tok = load_tokenizer(str(small_tokenizer))
    encode = BatchEncoder(tok, threads=1)
    real = encode.fast.encode_batch

    def off_by_one_in_the_third(texts, **kw):
        ids = real(texts, **kw)
        ids[2] = ids[2][:-1]
        return ids

    assert encode(DOCS[:1]) == reference_ids(tok, DOCS[:1])  # a one-document first batch (a tiny test split)
    encode.fast.encode_batch = off_by_one_in_the_third
    assert encode(DOCS) == reference_ids(tok, DOCS)  # still checked: the run's documents 2 to 13
    assert encode.name == "tokenizers" and encode(DOCS[:2]) == reference_ids(tok, DOCS[:2])
    assert "encode document 4 differently" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not DUTCH_CORPUS.is_file(), reason="../shared/data/dutch is not present")
@pytest.mark.parametrize("which", ["dutch bpe", "english gpt2"])
def test_fast_encoder_matches_tokenizers_on_the_whole_real_corpus(which, gpt2_dir):
    with gzip.open(DUTCH_CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = load_tokenizer(str(gpt2_dir)) if which == "english gpt2" else train_bpe(texts[:500], 8192,
                                                                                   show_progress=False)
    encode = BatchEncoder(tok, threads=2)
    assert encode.name == "tiktoken"
    for i in range(0, len(texts), 1000):  # 4,252 documents; ~3.1 M (Dutch BPE) or 5.5 M (GPT-2) tokens
        batch = texts[i:i + 1000]
        assert encode(batch) == reference_ids(tok, batch)
