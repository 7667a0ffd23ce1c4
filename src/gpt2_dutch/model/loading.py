"""Load a trained model for inference: a final_model, run directory or -latest link -> (model, tokenizer, dir).

The one loader that generate, evaluate, serve, demo and bench share: GPT-2 only, safetensors only, never remote
code, the device and dtype picked by `devices`, CPU kernels from `cpu_kernels`, left padding for batches.

Nothing in the directory is trusted before it is checked, and nothing is allocated before the checks pass
(`inspect_model`): config.json is read bounded and its fields typed; its shapes are compared with the safetensors
header (names and shapes only, no tensor is read), so a config edited to 20,000 layers, or one layer more than
its weights, is one line instead of a model allocated at full size or run with a random layer; the weights must
fit in the memory that is free; generation_config.json is reduced to the keys and ranges we know.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2_dutch.core.devices import resolve_device, resolve_dtype
from gpt2_dutch.core.errors import UsageError, first_line, held_output
from gpt2_dutch.core.reading import open_regular, read_json, short
from gpt2_dutch.model.cpu_kernels import _use_cpu_decode_attention, pack_cpu_linears
from gpt2_dutch.model.presets import FAST_GELU, available_memory_bytes, check_fits
from gpt2_dutch.runs.records import model_dir_of

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
MAX_DIM = 2**31 - 1  # any larger shape is no GPT-2 (and its products would overflow int64 indexing)
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
SAVE_HINT = "use the config.json saved with these weights (save_pretrained writes both)"


def resolve_model_dir(path: str | Path) -> Path:
    """A final_model directory, a run directory (-> its final_model), or a -latest link (see records.model_dir_of),
    checked for loading: it exists, holds a config.json and safetensors weights."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"model path {p} does not exist; train one with `gpt2-dutch train` or pass --model-path")
    p = model_dir_of(p)
    if not (p / "config.json").exists():
        raise UsageError(f"{p} is not a model directory (no config.json); pass a final_model or run directory")
    weights = list(p.glob("*.safetensors")) + list(p.glob("*.safetensors.index.json"))
    if not weights:
        pickles = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        raise UsageError(f"{p} has no safetensors weights" + (
            f" (only {', '.join(pickles)}, which are not loaded for safety)" if pickles else "") +
            "; save the model with save_pretrained (safetensors)")
    return p


# ---- config.json

# The fields that decide the shapes (required: GPT2Config would fill a missing one with GPT-2 small's value) and
# the optional ones whose wrong type would fail deep inside the model's constructor, or build another model.
SHAPE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
BOOL_FIELDS = ("tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
               "reorder_and_upcast_attn", "use_cache")


def check_config(config: Any, where: str) -> dict[str, Any]:
    """config.json's mapping, checked as a GPT-2 config: one line naming the field otherwise."""
    from transformers.activations import ACT2FN

    if not isinstance(config, dict):
        raise UsageError(f"{where} must be a mapping (got {short(config)}); {SAVE_HINT}")
    model_type = config.get("model_type")
    if model_type is None:
        raise UsageError(f"{where} lacks 'model_type'; {SAVE_HINT}")
    if model_type != "gpt2":
        raise UsageError(f"{Path(where).parent} holds a {short(model_type)} model, not a causal language model of "
                         "the GPT-2 kind (config.json's model_type 'gpt2'), the only kind gpt2-dutch runs")

    def whole(key: str, value: Any, low: int, high: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise UsageError(f"{where}: '{key}' must be a whole number from {low} to {high:,} (got "
                             f"{short(value)}); {SAVE_HINT}")
        return value

    for key in SHAPE_FIELDS:
        if key not in config:
            raise UsageError(f"{where} lacks '{key}'; {SAVE_HINT}")
        whole(key, config[key], 1, MAX_DIM)
    if config["n_embd"] % config["n_head"]:
        raise UsageError(f"{where}: n_embd {config['n_embd']} is not a multiple of n_head {config['n_head']}; "
                         f"{SAVE_HINT}")
    if config.get("n_inner") is not None:
        whole("n_inner", config["n_inner"], 1, MAX_DIM)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            whole(key, config[key], 0, config["vocab_size"] - 1)
    for key in BOOL_FIELDS:
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise UsageError(f"{where}: '{key}' must be true or false (got {short(config[key])}); {SAVE_HINT}")
    eps = config.get("layer_norm_epsilon")
    if eps is not None and not (isinstance(eps, int | float) and not isinstance(eps, bool) and math.isfinite(eps)
                                and 0 < eps < 1):
        raise UsageError(f"{where}: 'layer_norm_epsilon' must be a number between 0 and 1 (got {short(eps)}); "
                         f"{SAVE_HINT}")
    act = config.get("activation_function")
    if act is not None and (not isinstance(act, str) or act not in ACT2FN):
        raise UsageError(f"{where}: 'activation_function' {short(act)} is not one transformers knows; {SAVE_HINT}")
    # Both would build another model than the weights: cross-attention layers that no file fills, or a quantizer
    # (and the libraries it imports) for plain weights.
    if config.get("add_cross_attention"):
        raise UsageError(f"{where}: add_cross_attention is set; gpt2-dutch runs decoder-only GPT-2 models")
    if config.get("quantization_config") is not None:
        raise UsageError(f"{where} describes a quantized model; gpt2-dutch loads plain safetensors weights only")
    return config


# ---- the safetensors header

def read_header(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} from the safetensors header(s): model.safetensors, or the shards its
    index names. Reads the headers only (safetensors' safe_open, keys, get_slice().get_shape()); allocates no
    tensor. The safetensors library refuses a header whose offsets do not cover the file exactly, so the shapes
    are those of the bytes that are there."""
    from safetensors import SafetensorError, safe_open

    if (model_dir / INDEX).exists():
        index = read_json(model_dir / INDEX, f"{model_dir / INDEX}", advice="is the directory complete?")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UsageError(f"{model_dir / INDEX} has no 'weight_map' of tensor names to files; is the directory "
                             "complete?")
        files = sorted(set(weight_map.values()))
        bad = [f for f in files if Path(f).name != f or f.startswith(".")]  # a path would leave the directory
        if bad:
            raise UsageError(f"{model_dir / INDEX} names {short(bad[0])}, not a file of this directory")
    elif (model_dir / WEIGHTS).exists():
        files = [WEIGHTS]
    else:
        others = ", ".join(sorted(f.name for f in model_dir.glob("*.safetensors")))
        raise UsageError(f"{model_dir} has no {WEIGHTS} (only {others}); save the model with save_pretrained")
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in files:
        path = model_dir / name
        open_regular(path, str(path), "is the directory complete?").close()  # no FIFO or device is opened below
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - a safe_open handle, not a mapping
                    piece = f.get_slice(key)
                    tensors[key] = (tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError, ValueError) as e:
            cause = first_line(e)
            raise UsageError(f"cannot load the model in {model_dir} ({name}: {cause}); is the directory "
                             "complete?") from None
    return tensors


# Buffers that older transformers saved with each block (the causal mask); the model rebuilds them.
IGNORED = (".attn.bias", ".attn.masked_bias")


def expected_tensors(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors a GPT2LMHeadModel of `config` loads, by name (without the `transformer.` prefix); check_weights
    builds it only once n_layer matches the layers the weights hold."""
    h, v, n = config["n_embd"], config["vocab_size"], config["n_layer"]
    f = config.get("n_inner") or 4 * h
    shapes = {"wte.weight": (v, h), "wpe.weight": (config["n_positions"], h), "ln_f.weight": (h,),
              "ln_f.bias": (h,)}
    block = {"ln_1.weight": (h,), "ln_1.bias": (h,), "attn.c_attn.weight": (h, 3 * h), "attn.c_attn.bias": (3 * h,),
             "attn.c_proj.weight": (h, h), "attn.c_proj.bias": (h,), "ln_2.weight": (h,), "ln_2.bias": (h,),
             "mlp.c_fc.weight": (h, f), "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (f, h), "mlp.c_proj.bias": (h,)}
    shapes.update({f"h.{i}.{k}": s for i in range(n) for k, s in block.items()})
    if not config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def check_weights(config: dict[str, Any], tensors: dict[str, tuple[tuple[int, ...], str]], model_dir: Path,
                  config_name: str = "config.json", fix: str = SAVE_HINT) -> int:
    """The parameter count of the weights, after checking that they are exactly what `config` describes: one line
    naming the first mismatch otherwise. `config_name` and `fix` word it for a caller whose config is not the
    directory's config.json (train's --init-from: the config it will build)."""
    def name(key: str) -> str:
        return key.removeprefix("transformer.")

    found = {name(k): v for k, v in tensors.items() if not k.endswith(IGNORED)}
    what = f"{model_dir}: {config_name} does not match the weights"

    def refuse(problem: str) -> UsageError:
        return UsageError(f"{what}: {problem}; {fix}")

    layers = {int(k.split(".")[1]) for k in found if k.startswith("h.") and k.split(".")[1].isdigit()}
    n = config["n_layer"]
    if layers != set(range(n)):
        count = f"{len(layers):,} layer{'s' if len(layers) != 1 else ''}"
        if len(layers) != n:
            raise refuse(f"it says n_layer {n:,}, the weights hold {count}")
        raise refuse(f"the weights lack layer {min(set(range(n)) - layers)} (it says n_layer {n:,})")
    for key, field, axis in (("wte.weight", "vocab_size", 0), ("wte.weight", "n_embd", 1),
                             ("wpe.weight", "n_positions", 0)):
        shape = found.get(key, ((),))[0]
        if len(shape) == 2 and shape[axis] != config[field]:
            raise refuse(f"it says {field} {config[field]:,}, the weights' {key} has {shape[axis]:,}")
    expected = expected_tensors(config)
    for key, shape in expected.items():
        if key not in found:
            if key == "lm_head.weight":
                raise refuse("it gives the LM head its own weight (tie_word_embeddings false), the weights "
                             "have no lm_head.weight")
            raise refuse(f"the weights lack {key}")
        if found[key][0] != shape:
            raise refuse(f"{key} is {list(found[key][0])} in the weights, {list(shape)} by the config")
        if found[key][1] not in FLOAT_DTYPES:
            raise UsageError(f"cannot load the model in {model_dir}: {key} is stored as {found[key][1]}, not as "
                             "floating point numbers")
    extra = sorted(set(found) - set(expected))
    if extra:
        if extra == ["lm_head.weight"]:
            raise refuse("the weights hold their own lm_head.weight, the config ties the LM head to the token "
                         "embedding (tie_word_embeddings true), which would drop it")
        more = f" (and {len(extra) - 1:,} more)" if len(extra) > 1 else ""
        raise refuse(f"the weights hold {short(extra[0])}{more}, which a GPT-2 of this config has no place for")
    return sum(math.prod(shape) for shape in expected.values())


@dataclass(frozen=True)
class SavedModel:
    """What `inspect_model` found: the checked config.json and the weights' parameter count."""

    directory: Path
    config: dict[str, Any]
    params: int

    def weights_bytes(self, dtype: torch.dtype) -> int:
        return self.params * dtype.itemsize


def inspect_model(path: str | Path) -> SavedModel:
    """Check a model directory as `load_model` will load it, reading config.json and the safetensors header only.

    Refused in one line: a config that is not a GPT-2's or whose fields have wrong types or are missing, weights
    whose tensor names or shapes are not those the config describes (more or fewer layers, another width,
    vocabulary or context), weights that are not floating point, and files that are not regular files."""
    model_dir = resolve_model_dir(path)
    where = str(model_dir / "config.json")
    config = check_config(read_json(model_dir / "config.json", where, advice=SAVE_HINT), where)
    for name in TOKENIZER_FILES:  # read by the tokenizer's loader, which would wait forever on a FIFO
        if (model_dir / name).exists():
            open_regular(model_dir / name, str(model_dir / name), "is the directory complete?").close()
    params = check_weights(config, read_header(model_dir), model_dir)
    return SavedModel(model_dir, config, params)


# ---- generation_config.json

# generation_config.json holds defaults for `model.generate`. Our commands pass every setting they use from their
# own flags, so what the file adds is what nobody asked for: num_beams 100000 is 100,000 sequences per prompt,
# return_dict_in_generate changes what generate returns, a huge min_new_tokens never stops. Only these keys are
# honoured, each within its range. Anything else is left out with a one-line note rather than refused: the file
# states defaults, not the model (the weights run the same without it), and models from elsewhere often carry
# settings for their own use (beam search for a summarizer); refusing them would stop a model that runs fine.
# A file that is not JSON, or not a regular file, is refused as config.json is: that is damage, not a setting.
NEUTRAL = {"transformers_version": None, "_from_model_config": None, "num_beams": 1, "num_beam_groups": 1,
           "num_return_sequences": 1, "use_cache": True, "output_scores": False, "output_attentions": False,
           "output_hidden_states": False, "output_logits": False, "return_dict_in_generate": False,
           "length_penalty": 1.0, "early_stopping": False, "no_repeat_ngram_size": 0, "min_length": 0,
           "typical_p": 1.0, "diversity_penalty": 0.0, "remove_invalid_values": False, "renormalize_logits": False}
MAX_EOS_IDS = 16
SAMPLING_ONLY = ("temperature", "top_k", "top_p")
MAX_NEW_TOKENS = 100_000  # longer than any GPT-2 context; beyond it a number can only be a mistake


def _honoured(key: str, value: Any, config: dict[str, Any]) -> bool:
    """Whether generation_config.json's `key: value` is one we honour, within its range."""
    vocab = config["vocab_size"]

    def whole(v: Any, low: int, high: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    def positive(v: Any, high: float = math.inf) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= high

    if key in ("bos_token_id", "pad_token_id"):
        return whole(value, 0, vocab - 1)
    if key == "eos_token_id":
        return whole(value, 0, vocab - 1) or (isinstance(value, list) and 0 < len(value) <= MAX_EOS_IDS
                                              and all(whole(v, 0, vocab - 1) for v in value))
    if key == "suppress_tokens":
        return isinstance(value, list) and len(value) <= vocab and all(whole(v, 0, vocab - 1) for v in value)
    if key == "do_sample":
        return isinstance(value, bool)
    if key in ("temperature", "repetition_penalty"):
        return positive(value)
    if key == "top_p":
        return positive(value, 1.0)
    if key == "top_k":
        return whole(value, 0, vocab)
    if key == "max_new_tokens":  # our own files say 100 whatever the context: generating caps it at the context
        return whole(value, 1, MAX_NEW_TOKENS)
    return False


def read_generation_config(model_dir: Path, config: dict[str, Any]) -> tuple[Any, str | None]:
    """(GenerationConfig of the honoured keys, a note naming what was left out or None)."""
    from transformers import GenerationConfig

    path = model_dir / "generation_config.json"
    if not path.exists():
        return GenerationConfig(), None
    raw = read_json(path, str(path), advice="delete it or save it again with GenerationConfig.save_pretrained")
    if not isinstance(raw, dict):
        raise UsageError(f"{path} must be a mapping (got {short(raw)}); delete it or save it again with "
                         "GenerationConfig.save_pretrained")
    honoured = {k: v for k, v in raw.items() if _honoured(k, v, config)}
    left_out = [f"{k}={short(v, 30)}" for k, v in raw.items()
                if k not in honoured and v is not None and NEUTRAL.get(k, object()) != v
                and k not in ("transformers_version", "_from_model_config")]
    # greedy defaults: transformers would ignore these anyway (with a warning), so they go without a note
    kept = honoured if honoured.get("do_sample") is True else \
        {k: v for k, v in honoured.items() if k not in SAMPLING_ONLY}
    note = None
    if left_out:
        more = f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
        note = (f"{path}: not used: {', '.join(left_out[:5])}{more} (only token ids and sampling defaults within "
                "range are read; the command's flags set the rest)")
    return GenerationConfig(**kept), note


# ---- loading

def load_model(path: str | Path, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any, Path]:
    """(model, tokenizer, directory) for a saved GPT-2: checked by `inspect_model`, refused in one line where its
    weights do not fit in the free memory, then loaded from safetensors, never with remote code."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_dutch.data.tokenizer import BadTokenizer, load_tokenizer_dir

    saved = inspect_model(path)
    model_dir = saved.directory
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    need = saved.weights_bytes(torch_dtype)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(torch_dtype, str(torch_dtype))
    what = f"loading the model in {model_dir} ({saved.params:,} parameters in {name})"
    fix = "use a machine with more memory, a smaller model, or --precision bf16" if torch_dtype.itemsize > 2 \
        else "use a machine with more memory or a smaller model"
    check_fits(need, available_memory_bytes("cpu"), what, fix)  # the weights are read into host memory first
    if dev.type == "cuda":
        check_fits(need, available_memory_bytes(dev), f"{what} on {dev}", fix)
    generation_config, note = read_generation_config(model_dir, saved.config)
    if note:
        print(f"gpt2-dutch: note: {note}", file=sys.stderr, flush=True)
    try:
        tokenizer = load_tokenizer_dir(model_dir)  # checked files, no library output before the one line
    except BadTokenizer as e:
        raise UsageError(f"cannot load the model in {model_dir}: its tokenizer does not load ({e.cause}); is the "
                         "directory complete?") from None
    vocab = saved.config["vocab_size"]
    if len(tokenizer) > vocab:  # ids past the embedding table would fail in the middle of generating
        raise UsageError(f"cannot load the model in {model_dir}: its tokenizer has {len(tokenizer):,} tokens, the "
                         f"model's embedding only {vocab:,}; the tokenizer belongs to another model")
    config = GPT2Config.from_dict(saved.config)
    if config.activation_function == "gelu_new":
        # Models saved with GPT-2's gelu_new run the same function through one fused op (see presets.FAST_GELU).
        config.activation_function = FAST_GELU
    with held_output():  # its load report and bar would come before any later error line
        try:
            model = GPT2LMHeadModel.from_pretrained(str(model_dir), config=config, dtype=torch_dtype,
                                                    generation_config=generation_config, use_safetensors=True,
                                                    trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - weights damaged between the header and the data
            cause = first_line(e)
            raise UsageError(f"cannot load the model in {model_dir} ({cause}); is the directory complete?") from None
    model.to(dev).eval()
    if dev.type == "cpu":
        _use_cpu_decode_attention(model)
    if dev.type == "cpu" and torch_dtype == torch.bfloat16:
        pack_cpu_linears(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # only for left-padding batches; masked out by attention
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return model, tokenizer, model_dir


def context_length(model: Any) -> int | None:
    """The model's position table (GPT-2: n_positions), or None for a model without one."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

