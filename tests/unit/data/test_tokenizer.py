"""data/tokenizer.py: the fast encoder gives the ids of `tokenizers`, long texts in pieces, BPE training, and the
light tokenizer equals the transformers one."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
from types import SimpleNamespace

import pytest
from helpers import DOCS, DUTCH_CORPUS
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from gpt2_dutch.data.tokenizer import EOS_TOKEN, VOCAB_BYTES, BatchEncoder, load_tokenizer, train_bpe


@pytest.mark.slow
def test_the_light_tokenizer_is_the_transformers_one(tmp_path, gpt2_dir, small_tokenizer):
    from transformers import AutoTokenizer

    from gpt2_dutch.data.tokenizer import load_tokenizer, load_tokenizer_files

    for source in (gpt2_dir, small_tokenizer):
        light, full = load_tokenizer_files(str(source)), load_tokenizer(str(source))
        assert light.hf is None, "read with tokenizers alone"
        assert json.loads(light.backend.to_str()) == json.loads(full.backend_tokenizer.to_str())
        assert (len(light), light.eos_token, light.eos_token_id) == (len(full), full.eos_token, full.eos_token_id)
        saved = tmp_path / source.name
        saved.mkdir()
        light.save(saved, 64)
        again = AutoTokenizer.from_pretrained(str(saved))
        text = "Het Nederlandse taalgebied<|endoftext|> telt ruim 25 miljoen sprekers."
        assert again(text)["input_ids"] == full(text)["input_ids"]
        assert again.eos_token == again.bos_token == "<|endoftext|>" and again.model_max_length == 64


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


# ------------------------------------------------------------------------------- long documents in pieces


# Unicode's White_Space property (PropList.txt): what \s means to the Rust regex engines of tokenizers and tiktoken.
UNICODE_WHITE_SPACE = [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
                       0x205F, 0x3000]


def test_every_unicode_white_space_is_python_whitespace():
    """split_long_text decides "non-space" with Python's \\S: safe only if it is never wider than Rust's \\S."""

    assert all(re.fullmatch(r"\s", chr(c)) for c in UNICODE_WHITE_SPACE)


def random_text(rng, n: int) -> str:
    """Text that is hard on the pre-tokenizer: every kind of space next to letters, digits, contractions,
    punctuation, emoji and <|endoftext|>, in runs of every length."""
    atoms = ["de", "Zo'n", "'s", "'t", "'ll", "3,14", "1.000", "!", "\u201c", ".", "\u00e9", "e\u0301", "\U0001f389",
             "\u65e5\u672c", EOS_TOKEN, " ", " ", " ", "  ", "\t", "\n", "\n\n", "\u00a0", "\u2009", "\u3000", "\x1c",
             "\r\n", " '", "x"]
    return "".join(rng.choice(atoms) for _ in range(n))


@pytest.mark.parametrize("tokenizer", ["dutch bpe", "english gpt2"])
def test_pieces_of_a_long_text_encode_to_the_ids_of_the_whole(tokenizer, small_tokenizer, request):

    from gpt2_dutch.data.tokenizer import split_long_text

    path = small_tokenizer if tokenizer == "dutch bpe" else request.getfixturevalue("gpt2_dir")
    tok = load_tokenizer(str(path))
    backend = tok.backend_tokenizer
    fast = BatchEncoder(tok, threads=1).fast
    rng = random.Random(0)
    cut = 0
    for _ in range(200):
        text = random_text(rng, rng.randrange(1, 400))
        pieces = split_long_text(text, max_chars=rng.randrange(1, 40))  # tiny pieces: every boundary is used
        assert "".join(pieces) == text
        cut += len(pieces) - 1
        whole = backend.encode(text, add_special_tokens=False).ids
        assert [i for p in pieces for i in backend.encode(p, add_special_tokens=False).ids] == whole
        assert [i for p in pieces for i in fast.encode(p, allowed_special="all")] == whole
    assert cut > 1000  # the texts really were cut, many times


@pytest.mark.parametrize("engine", ["auto", "tokenizers"])
def test_batch_encoder_encodes_long_documents_in_pieces_with_the_same_ids(small_tokenizer, engine, monkeypatch):

    from gpt2_dutch.data import tokenizer as tokenizer_module

    tok = load_tokenizer(str(small_tokenizer))
    rng = random.Random(1)
    texts = [random_text(rng, 3000), DOCS[0], " ".join(DOCS) * 30, random_text(rng, 2000)]
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 500)
    encode = BatchEncoder(tok, threads=2, engine=engine)
    seen: list[int] = []
    inner = encode._encode
    monkeypatch.setattr(encode, "_encode", lambda batch: seen.append(max(map(len, batch))) or inner(batch))
    assert encode(texts) == reference_ids(tok, texts)
    assert seen and seen[0] < 700  # what reached the Rust encoders was pieces, not 30,000-character documents


def test_a_bpe_trained_on_the_pieces_is_the_bpe_trained_on_the_whole():

    from gpt2_dutch.data.tokenizer import split_long_text

    rng = random.Random(2)
    text = " ".join(DOCS) * 5 + random_text(rng, 3000)
    whole = train_bpe([text], 600, show_progress=False)
    pieces = train_bpe(split_long_text(text, max_chars=50), 600, show_progress=False)
    assert len(split_long_text(text, max_chars=50)) > 100
    assert whole.get_vocab() == pieces.get_vocab()
    assert whole.backend_tokenizer.to_str() == pieces.backend_tokenizer.to_str()


# ---- tokenizer directories: checked before any loader reads them


def _damage(name: str, content) -> callable:
    def damage(d):
        path = d / name
        path.unlink(missing_ok=True)
        if content == "<fifo>":
            os.mkfifo(path)
        elif content == "<dev/zero>":
            path.symlink_to("/dev/zero")
        elif content == "<huge>":
            with open(path, "wb") as f:  # sparse: no disk used
                f.truncate(VOCAB_BYTES + 1)
        elif content is not None:
            path.write_text(content)
    return damage


def _empty_vocabulary(path):
    spec = json.loads(path.read_text())
    spec["model"].update(vocab={}, merges=[])
    spec["added_tokens"] = []
    path.write_text(json.dumps(spec))


def _drop_field(path, field):
    spec = json.loads(path.read_text())
    del spec[field]
    path.write_text(json.dumps(spec))


BAD_TOKENIZER_DIRS = [
    pytest.param(_damage("tokenizer.json", "<fifo>"), "tokenizer.json is a FIFO, not a regular file", id="fifo"),
    pytest.param(_damage("tokenizer_config.json", "<dev/zero>"), "tokenizer_config.json is a device", id="dev-zero"),
    pytest.param(_damage("tokenizer.json", "<huge>"), "tokenizer.json is larger than 256 MiB", id="huge"),
    pytest.param(_damage("tokenizer.json", "geen json"), "tokenizer.json is not valid JSON (line 1", id="garbage"),
    pytest.param(_damage("tokenizer_config.json", '{"eos_token":\n' + "[" * 100_000 + "]" * 100_000 + "}"),
                 "tokenizer_config.json line 2: lists or mappings nested deeper than 100 levels", id="deep"),
    pytest.param(_damage("tokenizer_config.json", '{"model_max_length": ' + "9" * 5000 + "}"),
                 "tokenizer_config.json line 1: a number of 5000 characters", id="long-number"),
    pytest.param(_damage("special_tokens_map.json", "<fifo>"), "special_tokens_map.json is a FIFO", id="side-fifo"),
    pytest.param(_damage("tokenizer.json", None), "it holds no vocabulary", id="config-only"),
    pytest.param(lambda d: [p.unlink() for p in d.iterdir()], "it holds no tokenizer; expected tokenizer.json",
                 id="empty"),
    pytest.param(lambda d: _empty_vocabulary(d / "tokenizer.json"), "encodes text to no tokens",
                 id="empty-vocabulary"),
    pytest.param(lambda d: _drop_field(d / "tokenizer.json", "model"), "Model missing", id="missing-model"),
]


@pytest.mark.parametrize(("damage", "message"), BAD_TOKENIZER_DIRS)
def test_a_bad_tokenizer_directory_is_one_line_for_every_loader(damage, message, small_tokenizer, tmp_path, no_hang):
    """load_tokenizer_dir (train, generate, evaluate, serve), load_tokenizer and load_tokenizer_files
    (preprocess --tokenizer): a FIFO or a device is never opened, nothing huge or deep is parsed, and a directory
    without a vocabulary is refused rather than loaded as an empty tokenizer."""
    from gpt2_dutch.data.tokenizer import BadTokenizer, load_tokenizer_dir, load_tokenizer_files

    directory = tmp_path / "tok"
    shutil.copytree(small_tokenizer, directory)
    damage(directory)
    for load in (load_tokenizer_dir, load_tokenizer, load_tokenizer_files):
        with pytest.raises(BadTokenizer) as refused:
            load(str(directory))
        text = str(refused.value)
        assert text.startswith(f"cannot load the tokenizer in {directory}: ") and message in text, text
        assert "\n" not in text and len(text.replace(str(directory), "")) < 300, text


def test_a_gpt2_style_vocab_and_merges_directory_still_loads(small_tokenizer, tmp_path):
    from gpt2_dutch.data.tokenizer import load_tokenizer_dir, load_tokenizer_files

    full = load_tokenizer(str(small_tokenizer))
    directory = tmp_path / "bpe"
    directory.mkdir()
    full.backend_tokenizer.model.save(str(directory))  # vocab.json + merges.txt only
    text = "De trein naar Utrecht vertrekt om kwart over negen."
    assert load_tokenizer_dir(directory)(text)["input_ids"] == full(text)["input_ids"]
    light = load_tokenizer_files(str(directory))
    assert light.hf is None and light.backend.encode(text).ids == full(text)["input_ids"]
