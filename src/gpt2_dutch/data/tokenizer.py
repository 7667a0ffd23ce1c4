"""Tokenizers: train a Dutch byte-level BPE, or load an existing one, always as a transformers fast tokenizer.

The default is a byte-level BPE (GPT-2's algorithm and pre-tokenizer) trained on the dataset's own training
split: the English GPT-2 BPE spends 2.4 tokens per Dutch word where a Dutch BPE spends about 1.4, so the
same compute sees ~70% more text. `<|endoftext|>` is the only special token and serves as EOS, BOS and UNK,
exactly as in GPT-2, so every saved tokenizer opens with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2_dutch.core.errors import UsageError, first_line, held_output
from gpt2_dutch.core.reading import CONFIG_BYTES, BadFile, open_regular, parse_json, read_text

if TYPE_CHECKING:  # tokenizers and transformers are imported where they are used: --help imports this module
    from tokenizers import Tokenizer
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerBase

EOS_TOKEN = "<|endoftext|>"
# 256 byte symbols + <|endoftext|>: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 257
# uint16 holds ids up to 65535; the default leaves room and is a multiple of 64 (fast matmuls on GPUs).
DEFAULT_VOCAB_SIZE = 32768


def train_bpe(texts: Iterable[str], vocab_size: int, *, total_docs: int | None = None,
              show_progress: bool = True) -> GPT2TokenizerFast:
    """Train a GPT-2-style byte-level BPE on `texts` and return it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise UsageError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            "(256 bytes + <|endoftext|>); use e.g. --vocab-size 32768"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=total_docs)
    # Round-trip through vocab.json/merges.txt so the result is exactly the class and pre-tokenizer that
    # transformers builds for GPT-2 (and what AutoTokenizer gives back after saving).
    with tempfile.TemporaryDirectory() as tmp:
        tok.model.save(tmp)
        return _gpt2_from_files(Path(tmp))


def _gpt2_from_files(directory: Path, texts: dict[str, str] | None = None) -> GPT2TokenizerFast:
    """GPT2TokenizerFast of vocab.json + merges.txt (their text from `texts` where read_tokenizer_dir read it)."""
    from transformers import GPT2TokenizerFast

    texts = texts or {}
    vocab = json.loads(texts.get("vocab.json") or (directory / "vocab.json").read_text(encoding="utf-8"))
    merges_lines = (texts.get("merges.txt") or (directory / "merges.txt").read_text(encoding="utf-8")).splitlines()
    merges = [tuple(line.split(" ")) for line in merges_lines if line and not line.startswith("#version")]
    if EOS_TOKEN not in vocab:
        vocab[EOS_TOKEN] = len(vocab)
    return GPT2TokenizerFast(vocab=vocab, merges=merges, add_prefix_space=False)


# ------------------------------------------------------------------------------------ tokenizer directories

# Every file of a tokenizer directory that transformers' or tokenizers' loaders may read, with the most bytes it
# may have: each present is checked before a loader opens it (regular file, size; JSON parsed through
# core/reading: depth, number length, text). The largest vocabularies (262k tokens) have a ~35 MB tokenizer.json.
VOCAB_BYTES = 256 * 2**20
TOKENIZER_FILES = {"tokenizer.json": VOCAB_BYTES, "vocab.json": VOCAB_BYTES, "merges.txt": VOCAB_BYTES,
                   "tokenizer_config.json": CONFIG_BYTES, "special_tokens_map.json": CONFIG_BYTES,
                   "added_tokens.json": CONFIG_BYTES, "config.json": CONFIG_BYTES, "chat_template.jinja": CONFIG_BYTES,
                   "tokenizer.model": VOCAB_BYTES, "spiece.model": VOCAB_BYTES, "sentencepiece.bpe.model": VOCAB_BYTES,
                   "vocab.txt": VOCAB_BYTES}
# A directory without one of these holds no vocabulary: transformers would build an empty tokenizer from
# tokenizer_config.json alone (or from nothing but a model's config.json) that encodes every text to no tokens.
VOCAB_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("spiece.model",),
               ("sentencepiece.bpe.model",), ("vocab.txt",))
NO_VOCAB = "expected tokenizer.json (a saved tokenizer or processed dataset) or GPT-2-style vocab.json + merges.txt"
PROBE_TEXT = "Een zin om te tellen."


class BadTokenizer(UsageError):
    """A tokenizer directory that cannot be loaded as a tokenizer: `cause` says why, in words a caller can quote."""

    def __init__(self, directory: Path, cause: str):
        super().__init__(f"cannot load the tokenizer in {directory}: {cause}")
        self.directory, self.cause = directory, cause


def read_tokenizer_dir(directory: Path) -> dict[str, str]:
    """Check the tokenizer files of `directory` as TOKENIZER_FILES says, before any loader opens one; the text of
    each JSON file and of merges.txt, by name. A directory with no vocabulary (VOCAB_FILES) is refused."""
    texts: dict[str, str] = {}
    for name, limit in TOKENIZER_FILES.items():
        path = directory / name
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            if name.endswith(".json") or name == "merges.txt":
                text = read_text(path, name, limit)
                if name.endswith(".json"):
                    parse_json(text, name)
                texts[name] = text
            else:  # binary or not parsed by us: that it is a regular file within the bound is what matters
                with open_regular(path, name) as f:
                    if os.fstat(f.fileno()).st_size > limit:
                        raise BadFile(f"{name} is larger than {limit // 2**20} MiB, too large for this kind of file")
        except BadFile as e:
            raise BadTokenizer(directory, str(e)) from None
    if not any(all((directory / n).exists() for n in files) for files in VOCAB_FILES):
        what = "vocabulary" if texts else "tokenizer"  # settings without the tokens, or nothing at all
        raise BadTokenizer(directory, f"it holds no {what}; {NO_VOCAB}")
    return texts


def load_tokenizer_dir(directory: str | Path) -> PreTrainedTokenizerBase:
    """The transformers tokenizer saved in `directory`, checked (read_tokenizer_dir) before it is loaded and
    refused in one line (`BadTokenizer`) where it does not load or encodes text to nothing; what the library
    prints while loading is held (core/errors.held_output), so nothing comes before that line. The one way every
    command loads a tokenizer directory (a dataset's, a model's, --tokenizer)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    texts = read_tokenizer_dir(directory)
    with held_output():
        try:
            if "tokenizer.json" in texts or "tokenizer_config.json" in texts:
                tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
            else:
                tok = _gpt2_from_files(directory, texts)
        except Exception as e:  # noqa: BLE001 - any failure here is a broken directory
            raise BadTokenizer(directory, _cause(e)) from None
    if not tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]:
        raise BadTokenizer(directory, f"its vocabulary ({len(tok):,} tokens) encodes text to no tokens; {NO_VOCAB}")
    return tok


def load_tokenizer(name_or_dir: str) -> PreTrainedTokenizerBase:
    """Load `gpt2`/any Hub name, a saved tokenizer dir, or a dir with GPT-2-style vocab.json + merges.txt."""
    from transformers import AutoTokenizer

    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        tok = load_tokenizer_dir(path)
    elif path.exists() or name_or_dir.startswith((".", "/", "~")):
        raise UsageError(f"tokenizer path {name_or_dir} is not a directory")
    else:
        with held_output():  # the Hub's retries, one warning each, would come before the one line
            try:
                tok = AutoTokenizer.from_pretrained(name_or_dir)
            except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end here
                raise UsageError(
                    f"cannot load tokenizer '{name_or_dir}' from the Hugging Face Hub ({first_line(e, 300)}); "
                    "offline, pass a directory with vocab.json + merges.txt or a processed dataset to --tokenizer"
                ) from None
    if not getattr(tok, "is_fast", False):
        raise UsageError(f"tokenizer '{name_or_dir}' has no fast (Rust) version; use a fast tokenizer")
    if tok.eos_token_id is None:
        raise UsageError(f"tokenizer '{name_or_dir}' has no end-of-text (EOS) token; set eos_token and save it")
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------- the light tokenizer of preprocess

# What transformers writes as tokenizer_config.json for a GPT-2-style BPE (model_max_length is set on saving).
GPT2_TOKENIZER_CONFIG = {"add_prefix_space": False, "backend": "tokenizers", "bos_token": EOS_TOKEN,
                         "eos_token": EOS_TOKEN, "errors": "replace", "pad_token": None,
                         "tokenizer_class": "GPT2Tokenizer", "unk_token": EOS_TOKEN}


class TokenizerFiles:
    """A tokenizer as preprocess needs it: the Rust backend, the EOS token, and how to save it for AutoTokenizer.

    Loading a tokenizer through transformers (its imports, and building GPT-2's from vocab.json + merges.txt)
    costs about half of a small preprocess run (docs/experiments/preprocess-speed.md). A saved
    tokenizer directory (tokenizer.json + tokenizer_config.json, what preprocess and save_pretrained write) and
    GPT-2-style vocab.json + merges.txt are read here with `tokenizers` alone; anything else (a Hub name, a
    directory transformers must convert) goes through `load_tokenizer`. The ids are the same either way (tested).
    """

    def __init__(self, backend: Tokenizer, eos_token: str, config: dict[str, Any] | None = None,
                 transformers_tokenizer: Any = None):
        self.backend = backend
        self.eos_token = eos_token
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise UsageError(f"the tokenizer's end-of-text token {eos_token!r} is not in its vocabulary")
        self.eos_token_id: int = eos_id
        self.config = dict(GPT2_TOKENIZER_CONFIG if config is None else config)
        self.hf = transformers_tokenizer

    @classmethod
    def of(cls, tok: Any) -> TokenizerFiles:
        """Wrap a transformers tokenizer (a trained BPE, a Hub tokenizer): saved with its own save_pretrained."""
        return cls(tok.backend_tokenizer, tok.eos_token, {}, tok)

    def __len__(self) -> int:
        return len(self.hf) if self.hf is not None else self.backend.get_vocab_size(with_added_tokens=True)

    def save(self, directory: Path, model_max_length: int) -> None:
        if self.hf is not None:
            self.hf.model_max_length = model_max_length
            self.hf.save_pretrained(str(directory))
            return
        config = {**self.config, "model_max_length": model_max_length}
        config.setdefault("eos_token", self.eos_token)
        if config.get("bos_token") is None:  # as load_tokenizer does: EOS doubles as BOS
            config["bos_token"] = config["eos_token"]
        self.backend.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False,
                                                                   sort_keys=True) + "\n")


def load_tokenizer_files(name_or_dir: str) -> TokenizerFiles:
    """The tokenizer for preprocess: read with `tokenizers` alone where the files allow it (see TokenizerFiles)."""
    from tokenizers import Tokenizer

    path = Path(name_or_dir).expanduser()
    if not path.is_dir():
        return TokenizerFiles.of(load_tokenizer(name_or_dir))
    texts = read_tokenizer_dir(path)  # what is read below and by load_tokenizer is checked first
    if "tokenizer.json" in texts and "tokenizer_config.json" in texts:
        try:
            config = json.loads(texts["tokenizer_config.json"])
            eos = config.get("eos_token") if isinstance(config, dict) else None
            eos = eos.get("content") if isinstance(eos, dict) else eos
            backend = Tokenizer.from_str(texts["tokenizer.json"])
        except Exception:  # noqa: BLE001 - anything unusual: transformers' loader gives the precise error
            eos = None
        if isinstance(eos, str) and backend.token_to_id(eos) is not None and _encodes_text(backend):
            return TokenizerFiles(backend, eos, config)
    elif "tokenizer_config.json" not in texts and "vocab.json" in texts and "merges.txt" in texts:
        backend = _gpt2_backend(path)
        if not _encodes_text(backend):
            raise BadTokenizer(path, f"its vocabulary encodes text to no tokens; {NO_VOCAB}")
        return TokenizerFiles(backend, EOS_TOKEN)
    return TokenizerFiles.of(load_tokenizer(name_or_dir))


def _cause(error: Exception) -> str:
    """A loader's failure in words (transformers' KeyError for a missing field of tokenizer.json says only the
    key)."""
    return f"missing field {first_line(error, 100)}" if isinstance(error, KeyError) else first_line(error, 300)


def _encodes_text(backend: Tokenizer) -> bool:
    return bool(backend.encode(PROBE_TEXT, add_special_tokens=False).ids)


def _gpt2_backend(directory: Path) -> Tokenizer:
    """The backend GPT2TokenizerFast(vocab, merges, add_prefix_space=False) builds, built by `tokenizers` itself."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    try:
        model = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                     continuing_subword_prefix="", end_of_word_suffix="")
    except Exception as e:  # noqa: BLE001 - a damaged vocab.json or merges.txt
        raise BadTokenizer(directory, _cause(e)) from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tok


# ------------------------------------------------------------------------------------------ batch encoding

# The pre-tokenizer pattern of GPT-2, used by `tokenizers`' ByteLevel(use_regex=True) and by tiktoken's gpt2.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENCODERS = ["auto", "tokenizers"]
VERIFY_DOCS = 64  # the first documents of a run, encoded both ways before the fast encoder is trusted
# Documents longer than this are encoded (and trained on) in pieces: the Rust encoders keep per-byte alignments,
# offsets and token strings for the whole text, gigabytes for one long document (docs/experiments/preprocess-speed.md).
PIECE_CHARS = 1 << 16
# A space with a non-space character on either side: GPT-2's pre-tokenizer (GPT2_PATTERN) always starts a new
# pre-token there. The pre-token holding the character before it ends at it, because only the whitespace
# alternatives match a space after their first character; the one starting at it is " " plus what follows
# (` ?\p{L}+`, ` ?\p{N}+` or ` ?[^\s\p{L}\p{N}]+`), which never looks back. BPE merges never cross pre-tokens,
# so the ids of the pieces, joined, are the ids of the whole. Python's \s (str.isspace) includes every
# character of Unicode's White_Space, the \s of the Rust regex engines, so a Python \S is a Rust \S (tested).
_PIECE_BOUNDARY = re.compile(r"(?<=\S) (?=\S)")


def split_long_text(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of about `max_chars` at positions where GPT-2's pre-tokenizer always splits.

    Only for GPT-2-style byte-level BPEs (`splits_like_gpt2`). A stretch with no such position (no spaces)
    stays whole, however long.
    """
    if len(text) <= max_chars:
        return [text]
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        boundary = _PIECE_BOUNDARY.search(text, start + max_chars)
        if boundary is None:
            break
        pieces.append(text[start:boundary.start()])
        start = boundary.start()
    pieces.append(text[start:])
    return pieces


def splits_like_gpt2(backend: Tokenizer) -> bool:
    """Whether the ids of `split_long_text`'s pieces, joined, are the ids of the whole text for `backend`:
    GPT-2's regex pre-tokenizer with nothing before it, and no added token that could straddle a piece
    boundary (one containing a space)."""
    from tokenizers import models, pre_tokenizers

    pre = backend.pre_tokenizer
    return (backend.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex
            and not pre.add_prefix_space and isinstance(backend.model, models.BPE) and not backend.model.dropout
            and not any(" " in t.content for t in backend.get_added_tokens_decoder().values()))


class BatchEncoder:
    """Token ids of a batch of documents, exactly as `tokenizer(texts, add_special_tokens=False)` gives them.

    For a GPT-2-style byte-level BPE (what `preprocess` trains, and GPT-2 itself) tiktoken's encoder gives the
    same ids several times faster than `tokenizers`' encode_batch_fast (docs/experiments/preprocess-speed.md;
    identical ids were checked on a whole Dutch corpus with a Dutch and the English GPT-2 BPE). The two
    algorithms agree only when the vocabulary's ids follow the merge order (tiktoken merges the pair whose
    result has the lowest id, tokenizers the pair with the earliest merge), so `_tiktoken_for` checks that and
    the rest of the tokenizer's shape, and the first 64 documents are encoded both ways: any difference
    switches to `tokenizers` for the rest of the run.
    """

    def __init__(self, tokenizer: Any, threads: int, engine: str = "auto"):
        from tokenizers import Tokenizer

        # A transformers tokenizer, a TokenizerFiles, or a bare `tokenizers` backend.
        self.backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "backend", tokenizer)
        if self.backend.truncation or self.backend.padding:  # baked into some tokenizer.json files
            # Whole documents, never cut or padded: a copy with both off (the caller's tokenizer is untouched).
            self.backend = Tokenizer.from_str(self.backend.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()
        self.threads = threads
        self._fast = _tiktoken_for(self.backend) if engine == "auto" else None
        self.in_pieces = splits_like_gpt2(self.backend)
        self.restart()

    def restart(self, verify_docs: int = VERIFY_DOCS) -> None:
        """Check the fast encoder again on the next `verify_docs` documents, as at the start: preprocess calls this
        at the start of every part, so which encoder gives a part its ids depends on that part alone, never on
        which parts one worker happened to encode before it."""
        self.fast = self._fast
        self._unverified = verify_docs  # documents (pieces of long ones count one each) still to be compared

    @property
    def name(self) -> str:
        return "tiktoken" if self.fast is not None else "tokenizers"

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if not self.in_pieces or all(len(t) <= PIECE_CHARS for t in texts):
            return self._encode(texts)
        pieces: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            split = split_long_text(text, PIECE_CHARS)
            pieces += split
            owners += [i] * len(split)
        ids: list[list[int]] = [[] for _ in texts]
        for owner, piece_ids in zip(owners, self._encode(pieces), strict=True):
            ids[owner] += piece_ids
        return ids

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self.fast is not None:
            ids = self.fast.encode_batch(texts, num_threads=self.threads, allowed_special="all")
            if not self._unverified or self._agrees(texts, ids):
                return ids
        # encode_batch_fast skips the offsets and masks we never use: ~15% faster than encode_batch.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def _agrees(self, texts: list[str], ids: list[list[int]]) -> bool:
        n = min(len(texts), self._unverified)
        reference = self.backend.encode_batch(texts[:n], add_special_tokens=False)
        for i, (ours, theirs) in enumerate(zip(ids, reference, strict=False)):
            if ours != theirs.ids:
                done = VERIFY_DOCS - self._unverified
                print(f"note: tiktoken and tokenizers encode document {done + i + 1} differently; encoding "
                      "with tokenizers (slower) from here on", file=sys.stderr)
                self.fast = None
                return False
        self._unverified -= n
        return True


def _byte_symbols() -> dict[str, int]:
    """The byte-level alphabet: printable bytes stand for themselves, the other 68 are shifted to 256 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols = {chr(b): b for b in printable}
    shifted = sorted(set(range(256)) - set(printable))
    symbols.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return symbols


def _tiktoken_for(backend: Tokenizer) -> Any | None:
    """A tiktoken Encoding equivalent to `backend`, or None when the tokenizer is not a plain GPT-2-style BPE."""
    from tokenizers import models, pre_tokenizers

    pre, model = backend.pre_tokenizer, backend.model
    if (backend.normalizer is not None or not isinstance(pre, pre_tokenizers.ByteLevel)
            or pre.add_prefix_space or not pre.use_regex or not isinstance(model, models.BPE)
            or model.dropout or model.byte_fallback or model.continuing_subword_prefix
            or model.end_of_word_suffix):
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    added = backend.get_added_tokens_decoder()
    if any(not t.special or t.normalized or t.lstrip or t.rstrip or t.single_word for t in added.values()):
        return None
    symbols = _byte_symbols()
    vocab = {t: i for t, i in backend.get_vocab(with_added_tokens=False).items() if i not in added}
    if not set("".join(vocab)) <= symbols.keys():
        return None
    to_latin1 = str.maketrans({c: chr(b) for c, b in symbols.items()})  # then .encode("latin-1") = the bytes
    ranks = {t.translate(to_latin1).encode("latin-1"): i for t, i in vocab.items()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        lines = (Path(tmp) / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line.partition(" ") for line in lines if line and not line.startswith("#version")]
    merged_ids = [vocab.get(a + b, -1) for a, _, b in merges]
    # Every non-special token is a byte or the result of exactly one merge of two tokens, and ids rise with
    # merge order (each merged token after its parts).
    if (len(ranks) != 256 + len(merges) or sum(len(b) == 1 for b in ranks) != 256
            or any(a not in vocab or b not in vocab for a, _, b in merges) or min(merged_ids, default=0) < 0
            or any(x >= y for x, y in zip(merged_ids, merged_ids[1:], strict=False))
            or any(i < max(vocab[a], vocab[b]) for (a, _, b), i in zip(merges, merged_ids, strict=True))):
        return None
    return tiktoken.Encoding("gpt2-dutch", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={t.content: i for i, t in added.items()})
