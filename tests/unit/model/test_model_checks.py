"""Check before trusting: a saved model is checked before anything is allocated (model/loading.py), its
generation_config.json is reduced to known, bounded keys, and memory is estimated and checked (model/presets.py).

The models are built, not trained: GPT2Config with one or two layers of width 32, saved with save_pretrained.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error

from gpt2_dutch.model import loading, presets
from gpt2_dutch.model.loading import inspect_model, load_model, read_generation_config
from gpt2_dutch.model.presets import (
    ModelShape,
    available_memory_bytes,
    check_fits,
    format_bytes,
    model_shape,
    training_memory,
    training_memory_bytes,
)

VOCAB = 320  # the test tokenizer has 300 tokens


def save_model(out: Path, tokenizer_dir: Path, n_layer: int = 1, tie: bool = False, vocab: int = VOCAB,
               generation: dict | None = None) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=vocab, n_positions=32, bos_token_id=0,
                        eos_token_id=0, tie_word_embeddings=tie)
    GPT2LMHeadModel(config).save_pretrained(str(out), safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    (out / "generation_config.json").write_text(json.dumps(generation or {"eos_token_id": 0}))
    return out


@pytest.fixture
def model_dir(tmp_path: Path, small_tokenizer: Path) -> Path:
    return save_model(tmp_path / "model", small_tokenizer)


def edit_config(**changes):
    def edit(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        for key, value in changes.items():
            if value is DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        (d / "config.json").write_text(json.dumps(config))
    return edit


DELETE = object()


def write(name: str, data: bytes | str):
    def edit(d: Path) -> None:
        (d / name).unlink(missing_ok=True)
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return edit


def fifo(name: str):
    def edit(d: Path) -> None:
        (d / name).unlink(missing_ok=True)
        os.mkfifo(d / name)
    return edit


def edit_weights(change):
    """Rewrite model.safetensors with change(dict of tensors) applied."""
    from safetensors.torch import load_file, save_file

    def edit(d: Path) -> None:
        tensors = load_file(str(d / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit


def only_pickle(d: Path) -> None:
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


def renamed_weights(d: Path) -> None:
    (d / "model.safetensors").rename(d / "adapter_model.safetensors")


def escaping_index(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte.weight": "../x.safetensors"}}))


def truncated(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])


def deep(n: int) -> str:
    return "[" * n + "]" * n


SAYS = "config.json does not match the weights: "
REFUSED = [
    # model_type
    pytest.param(edit_config(model_type="llama"), "holds a 'llama' model, not a causal language model of the GPT-2 "
                 "kind", id="model-type-llama"),
    pytest.param(edit_config(model_type=DELETE), "config.json lacks 'model_type'", id="model-type-missing"),
    pytest.param(edit_config(model_type=["gpt2"]), "holds a ['gpt2'] model", id="model-type-list"),
    # the config's shapes against the safetensors header
    pytest.param(edit_config(n_layer=20_000), SAYS + "it says n_layer 20,000, the weights hold 1 layer",
                 id="n-layer-20000"),
    pytest.param(edit_config(n_layer=2), SAYS + "it says n_layer 2, the weights hold 1 layer",
                 id="n-layer-one-more"),
    pytest.param(edit_config(n_embd=64, n_head=2), SAYS + "it says n_embd 64, the weights' wte.weight has 32",
                 id="n-embd"),
    pytest.param(edit_config(vocab_size=1000), SAYS + "it says vocab_size 1,000, the weights' wte.weight "
                 "has 320", id="vocab-size"),
    pytest.param(edit_config(n_positions=64), SAYS + "it says n_positions 64, the weights' wpe.weight has 32",
                 id="n-positions"),
    pytest.param(edit_config(n_inner=64), SAYS + "h.0.mlp.c_fc.weight is [32, 128] in the weights, [32, 64] by "
                 "the config", id="n-inner"),
    pytest.param(edit_config(tie_word_embeddings=True), SAYS + "the weights hold their own lm_head.weight, "
                 "the config ties the LM head", id="tied-config-untied-weights"),
    pytest.param(edit_weights(lambda t: t.pop("lm_head.weight")), SAYS + "it gives the LM head its own "
                 "weight (tie_word_embeddings false), the weights have no lm_head.weight", id="head-missing"),
    pytest.param(edit_weights(lambda t: t.pop("transformer.h.0.ln_1.bias")), SAYS + "the weights lack h.0.ln_1.bias",
                 id="tensor-missing"),
    pytest.param(edit_weights(lambda t: t.update({"transformer.h.0.extra": torch.zeros(2)})),
                 SAYS + "the weights hold 'h.0.extra', which a GPT-2 of this config has no place for",
                 id="tensor-extra"),
    pytest.param(edit_weights(lambda t: t.update({"transformer.h.0.ln_1.bias": torch.zeros(32, dtype=torch.int64)})),
                 "h.0.ln_1.bias is stored as I64, not as floating point numbers", id="tensor-integer"),
    pytest.param(edit_weights(lambda t: t.update({"transformer.h.0.ln_1.bias": torch.zeros(33)})),
                 SAYS + "h.0.ln_1.bias is [33] in the weights, [32] by the config", id="tensor-shape"),
    # config.json fields of wrong types, missing, out of range
    pytest.param(edit_config(n_layer=DELETE), "config.json lacks 'n_layer'", id="n-layer-missing"),
    pytest.param(edit_config(n_embd=DELETE), "config.json lacks 'n_embd'", id="n-embd-missing"),
    pytest.param(edit_config(n_layer="1"), "'n_layer' must be a whole number from 1 to 2,147,483,647 (got '1')",
                 id="n-layer-string"),
    pytest.param(edit_config(n_layer=True), "'n_layer' must be a whole number from 1 to 2,147,483,647 (got True)",
                 id="n-layer-bool"),
    pytest.param(edit_config(n_layer=1.0), "'n_layer' must be a whole number", id="n-layer-float"),
    pytest.param(edit_config(n_layer=0), "'n_layer' must be a whole number from 1", id="n-layer-zero"),
    pytest.param(edit_config(n_layer=-1), "'n_layer' must be a whole number from 1", id="n-layer-negative"),
    pytest.param(edit_config(n_layer=None), "'n_layer' must be a whole number", id="n-layer-null"),
    pytest.param(edit_config(vocab_size=2**40), "'vocab_size' must be a whole number from 1 to 2,147,483,647 (got "
                 f"{2**40})", id="vocab-size-huge"),
    pytest.param(edit_config(n_head=3), "n_embd 32 is not a multiple of n_head 3", id="n-head-not-divisor"),
    pytest.param(edit_config(n_inner="big"), "'n_inner' must be a whole number", id="n-inner-string"),
    pytest.param(edit_config(eos_token_id=5000), "'eos_token_id' must be a whole number from 0 to 319 (got 5000)",
                 id="eos-outside-vocab"),
    pytest.param(edit_config(tie_word_embeddings="no"), "'tie_word_embeddings' must be true or false (got 'no')",
                 id="tie-string"),
    pytest.param(edit_config(layer_norm_epsilon=float("nan")), "'layer_norm_epsilon' must be a number between 0 and 1",
                 id="epsilon-nan"),
    pytest.param(edit_config(activation_function="nope"), "'activation_function' 'nope' is not one transformers knows",
                 id="activation-unknown"),
    pytest.param(edit_config(add_cross_attention=True), "add_cross_attention is set", id="cross-attention"),
    pytest.param(edit_config(quantization_config={"quant_method": "bitsandbytes"}), "describes a quantized model",
                 id="quantized"),
    # config.json damaged
    pytest.param(write("config.json", "[1, 2]"), "config.json must be a mapping (got [1, 2])", id="config-list"),
    pytest.param(write("config.json", "{not json"), "config.json is not valid JSON (line 1", id="config-not-json"),
    pytest.param(write("config.json", deep(100_000)), "nested deeper than 100 levels", id="config-deep"),
    pytest.param(write("config.json", '{"model_type": "gpt2", "n_layer": ' + "9" * 5000 + "}"),
                 "a number of 5000 characters", id="config-5000-digits"),
    pytest.param(write("config.json", b'{"model_type": "gpt2\xff"}'), "config.json is not UTF-8 text",
                 id="config-not-utf8"),
    pytest.param(fifo("config.json"), "config.json is a FIFO, not a regular file", id="config-fifo"),
    # weights: pickles, other names, damaged files
    pytest.param(only_pickle, "has no safetensors weights (only pytorch_model.bin, which are not loaded for safety)",
                 id="pickle-only"),
    pytest.param(renamed_weights, "has no model.safetensors (only adapter_model.safetensors)", id="weights-renamed"),
    pytest.param(escaping_index, "model.safetensors.index.json names '../x.safetensors', not a file of this "
                 "directory", id="index-leaves-directory"),
    pytest.param(write("model.safetensors.index.json", "[]"), "has no 'weight_map'", id="index-not-a-map"),
    pytest.param(truncated, "(model.safetensors: Error while deserializing header: incomplete metadata",
                 id="weights-truncated"),
    pytest.param(write("model.safetensors", b"\xff" * 64), "cannot load the model in", id="weights-garbage"),
    pytest.param(fifo("model.safetensors"), "model.safetensors is a FIFO, not a regular file", id="weights-fifo"),
    # the other files load_model reads
    pytest.param(fifo("tokenizer.json"), "tokenizer.json is a FIFO, not a regular file", id="tokenizer-fifo"),
    pytest.param(write("tokenizer.json", "{garbage"), "its tokenizer does not load", id="tokenizer-garbage"),
    pytest.param(fifo("generation_config.json"), "generation_config.json is a FIFO", id="generation-config-fifo"),
    pytest.param(write("generation_config.json", deep(5000)), "nested deeper than 100 levels",
                 id="generation-config-deep"),
    pytest.param(write("generation_config.json", '"beams"'), "generation_config.json must be a mapping",
                 id="generation-config-string"),
]


def forbid_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, building a GPT-2 fails the test: every refusal must come before any model exists."""
    from transformers import GPT2LMHeadModel

    def refuse(self, *args, **kwargs):
        raise AssertionError("a model was allocated before the checks refused it")

    monkeypatch.setattr(GPT2LMHeadModel, "__init__", refuse)


@pytest.fixture
def no_model_allocated(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_models(monkeypatch)


@pytest.mark.parametrize(("damage", "message"), REFUSED)
def test_a_model_that_does_not_check_out_is_one_line_before_anything_is_allocated(
        damage, message, model_dir, cli, no_model_allocated):
    damage(model_dir)
    rc, _, err = cli("generate", "--model-path", model_dir, "--prompt", "De trein", "--max-new-tokens", "2",
                     "--precision", "fp32")
    assert_one_line_error(rc, err, message)
    assert len(err.strip().splitlines()) == 1, err  # nothing of the libraries' before it


def test_a_tied_config_needs_no_head_and_an_untied_one_does(tmp_path, small_tokenizer, cli, monkeypatch):
    tied = save_model(tmp_path / "tied", small_tokenizer, tie=True)
    forbid_models(monkeypatch)
    edit_config(tie_word_embeddings=False)(tied)
    rc, _, err = cli("generate", "--model-path", tied, "--max-new-tokens", "2")
    assert_one_line_error(rc, err, "the weights have no lm_head.weight")


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, small_tokenizer, cli, monkeypatch):
    small = save_model(tmp_path / "m", small_tokenizer, vocab=200)
    forbid_models(monkeypatch)
    rc, _, err = cli("generate", "--model-path", small, "--max-new-tokens", "2")
    assert_one_line_error(rc, err, "its tokenizer has 300 tokens, the model's embedding only 200")


@pytest.mark.parametrize(("n_layer", "tie"), [(1, False), (2, False), (1, True), (2, True)])
def test_the_header_counts_every_parameter_and_the_weights_bytes(tmp_path, small_tokenizer, n_layer, tie):
    d = save_model(tmp_path / "m", small_tokenizer, n_layer=n_layer, tie=tie)
    saved = inspect_model(d)
    model, tokenizer, _ = load_model(d, "cpu", "fp32")
    assert saved.params == model.num_parameters() == model_shape(model.config).params
    # what the memory check asks for is what the loaded model's weights take
    assert saved.weights_bytes(torch.float32) == sum(p.numel() * p.element_size() for p in model.parameters())
    assert saved.weights_bytes(torch.bfloat16) * 2 == saved.weights_bytes(torch.float32)
    assert model.config.n_layer == n_layer and len(tokenizer) == 300


def test_weights_that_do_not_fit_in_the_free_memory_are_refused_naming_need_and_free(
        model_dir, cli, monkeypatch, no_model_allocated):
    monkeypatch.setattr(loading, "available_memory_bytes", lambda device="cpu": 1000)
    params = inspect_model(model_dir).params
    rc, _, err = cli("generate", "--model-path", model_dir, "--precision", "fp32")
    assert_one_line_error(rc, err, f"loading the model in {model_dir} ({params:,} parameters in fp32) needs "
                          f"about {format_bytes(params * 4)} of memory, but only 1000 bytes is free; use a machine "
                          "with more memory, a smaller model, or --precision bf16")


def test_an_xl_shaped_config_is_refused_for_memory_before_the_weights_are_read(monkeypatch):
    """An xl's header on a machine with 8 GiB free: the weights alone (1.6e9 x 4 bytes) do not fit."""
    from transformers import GPT2Config

    xl = presets.MODEL_PRESETS["xl"]
    shape = model_shape(GPT2Config(n_layer=xl.n_layer, n_embd=xl.n_embd, vocab_size=50257, n_positions=1024))
    assert 1.5e9 < shape.params < 1.6e9  # GPT-2 xl: 1.56e9 parameters with its tied head
    with pytest.raises(presets.UsageError, match=r"needs about 5\.8 GiB of memory, but only 4\.0 GiB is free"):
        check_fits(shape.params * 4, 4 * 2**30, "loading xl")


# ---- generation_config.json: known keys, in range; the rest left out with one note

CONFIG = {"vocab_size": VOCAB, "n_positions": 32}
GENERATION = [  # file contents, the keys kept (with their values), what the note names (None: no note)
    pytest.param({"num_beams": 100000}, {}, "num_beams=100000", id="num-beams-huge"),
    pytest.param({"num_beams": 1}, {}, None, id="num-beams-1-is-no-change"),
    pytest.param({"return_dict_in_generate": True}, {}, "return_dict_in_generate=True", id="return-dict"),
    pytest.param({"min_new_tokens": 10**9}, {}, "min_new_tokens=1000000000", id="min-new-tokens"),
    pytest.param({"max_new_tokens": 10**12}, {}, "max_new_tokens=1000000000000", id="max-new-tokens-huge"),
    pytest.param({"max_new_tokens": 5}, {"max_new_tokens": 5}, None, id="max-new-tokens-kept"),
    pytest.param({"max_new_tokens": 100}, {"max_new_tokens": 100}, None, id="max-new-tokens-past-context"),
    pytest.param({"max_new_tokens": 0}, {}, "max_new_tokens=0", id="max-new-tokens-0"),
    pytest.param({"top_k": -1}, {}, "top_k=-1", id="top-k-negative"),
    pytest.param({"top_k": 40, "do_sample": True}, {"top_k": 40}, None, id="top-k-kept"),
    pytest.param({"top_k": 40, "temperature": 0.7, "do_sample": False}, {"do_sample": False}, None,
                 id="sampling-defaults-of-a-greedy-file-are-no-change"),
    pytest.param({"top_p": 1.5}, {}, "top_p=1.5", id="top-p-above-1"),
    pytest.param({"temperature": 0}, {}, "temperature=0", id="temperature-0"),
    pytest.param({"temperature": "hot"}, {}, "temperature='hot'", id="temperature-string"),
    pytest.param({"temperature": 0.7, "do_sample": True}, {"temperature": 0.7, "do_sample": True}, None,
                 id="sampling-kept"),
    pytest.param({"do_sample": "yes"}, {}, "do_sample='yes'", id="do-sample-string"),
    pytest.param({"eos_token_id": [1, 2]}, {"eos_token_id": [1, 2]}, None, id="eos-list-kept"),
    pytest.param({"eos_token_id": 10**6}, {}, "eos_token_id=1000000", id="eos-outside-vocab"),
    pytest.param({"suppress_tokens": [0]}, {"suppress_tokens": [0]}, None, id="suppress-kept"),
    pytest.param({"suppress_tokens": list(range(10_000))}, {}, "suppress_tokens=[0, 1, 2, 3, 4, 5, ...]",
                 id="suppress-huge"),
    pytest.param({"transformers_version": "4.0", "_from_model_config": True}, {}, None, id="metadata-silent"),
    pytest.param({f"k{i}": i + 1 for i in range(8)}, {}, "k0=1, k1=2, k2=3, k3=4, k4=5 and 3 more", id="many-keys"),
]


@pytest.mark.parametrize(("content", "kept", "noted"), GENERATION)
def test_only_known_bounded_generation_keys_are_honoured(tmp_path, content, kept, noted, capfd):
    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    config, note = read_generation_config(tmp_path, CONFIG)
    assert capfd.readouterr().err == ""  # no warning of transformers' about the settings kept
    for key, value in kept.items():
        assert getattr(config, key) == value
    for key in content:
        if key not in kept and not key.startswith(("_", "transformers")):
            assert getattr(config, key, None) in (None, 1), key  # unset: transformers' default applies
    if noted is None:
        assert note is None
    else:
        assert note is not None and noted in note and "\n" not in note and len(note) < 400


def test_num_beams_100000_in_the_file_is_not_obeyed_on_the_batched_path(tmp_path, small_tokenizer, capsys):
    from gpt2_dutch.generate import GenerateConfig
    from gpt2_dutch.generate.sampling import generate_texts

    d = save_model(tmp_path / "m", small_tokenizer, generation={"eos_token_id": 0, "num_beams": 100000,
                                                                "return_dict_in_generate": True})
    model, tokenizer, _ = load_model(d, "cpu", "fp32")
    assert "num_beams=100000" in capsys.readouterr().err
    out = generate_texts(model, tokenizer, ["De trein", "Het weer in"],
                         GenerateConfig(max_new_tokens=3, greedy=True, prompt=[]))
    assert len(out) == 2 and all(len(c) == 1 and isinstance(c[0], str) for c in out)
    assert model.generation_config.num_beams in (None, 1)


# ---- memory: the estimate against what a real model takes

def _model(shape: ModelShape):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=2, n_inner=shape.n_inner,
                                      vocab_size=shape.vocab_size, n_positions=shape.context, bos_token_id=0,
                                      eos_token_id=0, tie_word_embeddings=shape.tie_embeddings, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, activation_function=presets.FAST_GELU))


SHAPES = [ModelShape(1, 32, 300, 32), ModelShape(2, 32, 300, 32, tie_embeddings=True),
          ModelShape(2, 64, 500, 16, n_inner=96), ModelShape(2, 128, 300, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_parameter_count_is_the_models(shape):
    model = _model(shape)
    assert shape.params == model.num_parameters()
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.ndim == 2)
    assert shape.matrix_params == blocks


def test_a_preset_shape_is_the_config_it_builds():
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(presets.gpt2_config("pico", 300, 32, 0, tie_embeddings=False))
    assert model_shape("pico", 300, 32).params == model.num_parameters()
    assert model_shape(model.config) == model_shape("pico", 300, 32)


def _state_bytes(model, optimizer) -> int:
    """Weights, gradients and optimizer state as they are after one step: what the static parts estimate."""
    tensors = [*model.parameters(), *(p.grad for p in model.parameters())]
    tensors += [t for state in optimizer.state.values() for t in state.values() if t.dim()]  # not the step counts
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_weights_gradients_and_optimizer_state_are_what_one_step_allocates(shape, optimizer):
    from gpt2_dutch.train.muon import MuonAdamW, param_groups

    model = _model(shape)
    opt = torch.optim.AdamW(model.parameters()) if optimizer == "adamw" else \
        MuonAdamW(param_groups(model, 1e-3, 0.0))
    ids = torch.randint(0, shape.vocab_size, (2, shape.context))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    parts = training_memory(shape, 2 * shape.context, optimizer, "fp32")
    assert parts["weights"] + parts["gradients"] + parts["optimizer"] == _state_bytes(model, opt)


def _saved_activation_bytes(model, ids, precision: str) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward (parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(input_ids=ids, labels=ids)
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("shape", "batch"), [(SHAPES[0], 4), (SHAPES[3], 4), (ModelShape(4, 128, 1000, 64), 8)],
                         ids=str)
def test_the_activation_estimate_is_within_a_factor_of_two_of_what_autograd_keeps(shape, batch, precision):
    model = _model(shape).train()
    ids = torch.randint(0, shape.vocab_size, (batch, shape.context))
    measured = _saved_activation_bytes(model, ids, precision)
    parts = training_memory(shape, batch * shape.context, "adamw", precision)
    # under autocast the half copies of the weights are kept for backward too: counted with the weights
    estimate = parts["activations"] + parts["weights"] - 4 * shape.params
    assert 0.5 < estimate / measured < 2, (estimate, measured)


def test_the_estimate_grows_as_it_should():
    shape = ModelShape(12, 768, 32000, 1024)
    full = training_memory_bytes(shape, 8 * 1024, "adamw", "bf16")
    assert training_memory_bytes(shape, 16 * 1024, "adamw", "bf16") > full  # more tokens
    assert training_memory_bytes(shape, 8 * 1024, "muon", "bf16") < full  # one state for the matrices
    assert training_memory_bytes(shape, 8 * 1024, "adamw", "bf16", gradient_checkpointing=True) < full
    chunked = training_memory(shape, 8 * 1024, "adamw", "bf16", loss_chunk_tokens=2048)
    assert full - sum(chunked.values()) == 2 * 4 * (8 * 1024 - 2048) * 32000  # only the logits' rows change
    # GPT-2 small with AdamW: 16 bytes a parameter (+2 for autocast's copies) before any activation
    static = training_memory(shape, 1, "adamw", "bf16")
    assert static["weights"] + static["gradients"] + static["optimizer"] == 18 * shape.params
    assert training_memory_bytes("small", 1024, vocab_size=32000, context=1024) == \
        training_memory_bytes(ModelShape(12, 768, 32000, 1024), 1024)


@pytest.mark.parametrize(("args", "error"), [(("sgd", "fp32"), "unknown optimizer"),
                                              (("adamw", "int8"), "unknown optimizer")])
def test_the_estimate_refuses_what_it_cannot_estimate(args, error):
    with pytest.raises(ValueError, match=error):
        training_memory_bytes(SHAPES[0], 64, *args)


# ---- what is free

def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def test_available_memory_is_memavailable_with_or_without_psutil(monkeypatch):
    monkeypatch.setattr(presets, "CGROUP_ROOT", Path("/nonexistent"))
    total = _meminfo("MemTotal")
    with_psutil = available_memory_bytes()
    monkeypatch.setitem(__import__("sys").modules, "psutil", None)  # import psutil now fails
    without = available_memory_bytes()
    assert 0 < without <= total and 0 < with_psutil <= total
    assert math.isclose(with_psutil, without, rel_tol=0.2)  # two readings of a moving figure


CGROUPS = [  # memory.max, memory.current, memory.stat's inactive_file, what is free (None: no limit)
    pytest.param("max", 5 * 2**30, 0, None, id="no-limit"),
    pytest.param(str(8 * 2**30), 5 * 2**30, 0, 3 * 2**30, id="limit-less-usage"),
    pytest.param(str(8 * 2**30), 5 * 2**30, 2**30, 4 * 2**30, id="page-cache-is-free"),
    pytest.param(str(2**30), 2 * 2**30, 0, 0, id="over-the-limit"),
]


@pytest.mark.parametrize(("limit", "usage", "cache", "free"), CGROUPS)
def test_a_containers_memory_limit_caps_what_is_free(tmp_path, monkeypatch, limit, usage, cache, free):
    (tmp_path / "memory.max").write_text(limit + "\n")
    (tmp_path / "memory.current").write_text(f"{usage}\n")
    (tmp_path / "memory.stat").write_text(f"anon 1\ninactive_file {cache}\nactive_file 7\n")
    monkeypatch.setattr(presets, "CGROUP_ROOT", tmp_path)
    assert presets._cgroup_free() == free
    host = 6 * 2**30  # the host's MemAvailable, fixed: two readings of the real one differ on a busy machine
    monkeypatch.setattr(presets, "_host_available", lambda: host)
    assert available_memory_bytes() == (host if free is None else min(host, free))


@pytest.mark.parametrize(("need", "free", "fits"), [(10, 10, True), (11, 10, False), (10**12, None, True),
                                                    (3 * 2**30, 2**30, False), (0, 0, True)])
def test_check_fits(need, free, fits):
    if fits:
        check_fits(need, free, "x")
    else:
        with pytest.raises(presets.UsageError) as e:
            check_fits(need, free, "training xl", "use a smaller --model-size")
        assert str(e.value) == f"training xl needs about {format_bytes(need)} of memory, but only " \
                               f"{format_bytes(free)} is free; use a smaller --model-size"


@pytest.mark.parametrize(("n", "text"), [(1000, "1000 bytes"), (2048, "2.0 KiB"), (5 * 2**20, "5.0 MiB"),
                                         (int(2.5 * 2**30), "2.5 GiB"), (3 * 2**40, "3072.0 GiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


# ---- evaluate: the dataset's chunks against the model, before a forward pass

CHUNKS = [  # rows, the message (None: accepted)
    pytest.param([[1, 2, 3], [4, 5, 6]], None, id="fits"),
    pytest.param([[1, 2, 3], [4, 5, 319]], None, id="last-id-of-the-vocabulary"),
    pytest.param([[1, 2, 3], [4, 5, 320]], "holds token id 320, outside the model's vocabulary of 320", id="id-past"),
    pytest.param([[1, -2, 3]], "holds token id -2, outside the model's vocabulary", id="id-negative"),
    pytest.param([[1, 2, 3], [4, 5]], "the chunks are not rows of at most 8 token ids", id="ragged"),
    pytest.param([[0.5, 1.0]], "the chunks are not rows of at most 8 token ids", id="floats"),
    pytest.param([list(range(9))], "the chunks are not rows of at most 8 token ids", id="longer-than-context"),
    pytest.param([[]], "the chunks are not rows of at most 8 token ids", id="empty-rows"),
    pytest.param([1, 2, 3], "the chunks are not rows of at most 8 token ids", id="flat"),
]


@pytest.mark.parametrize(("rows", "message"), CHUNKS)
def test_evaluate_checks_each_batch_of_chunks_against_the_model(rows, message):
    import numpy as np

    from gpt2_dutch.evaluate import _chunk_rows

    given = [np.asarray(r) for r in rows] if rows and isinstance(rows[0], list) else np.asarray(rows)
    if message is None:
        out = _chunk_rows(given, VOCAB, 8, "d/test (chunks 0-1)")
        assert out.dtype == np.int64 and out.tolist() == rows
    else:
        with pytest.raises(presets.UsageError, match=re.escape(message)) as e:
            _chunk_rows(given, VOCAB, 8, "d/test (chunks 0-1)")
        assert str(e.value).startswith("d/test (chunks 0-1)")
