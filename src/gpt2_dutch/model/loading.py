"""Load a trained model for inference: a final_model, run directory or -latest link -> (model, tokenizer, dir).

The one loader that generate, evaluate, demo and bench share: safetensors only, never remote code, the
device and dtype picked by `devices`, CPU kernels from `cpu_kernels`, left padding for batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpt2_dutch.core.devices import resolve_device, resolve_dtype
from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.model.cpu_kernels import _use_cpu_decode_attention, pack_cpu_linears
from gpt2_dutch.model.presets import FAST_GELU
from gpt2_dutch.runs.records import model_dir_of


def resolve_model_dir(path: str | Path) -> Path:
    """A final_model directory, a run directory (-> its final_model), or a -latest link (see records.model_dir_of),
    checked for loading: it exists, holds a config.json and safetensors weights."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"model path {p} does not exist; train one with `gpt2-dutch train` or pass --model-path")
    p = model_dir_of(p)
    if not (p / "config.json").is_file():
        raise UsageError(f"{p} is not a model directory (no config.json); pass a final_model or run directory")
    weights = list(p.glob("*.safetensors")) + list(p.glob("*.safetensors.index.json"))
    if not weights:
        pickles = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        raise UsageError(f"{p} has no safetensors weights" + (
            f" (only {', '.join(pickles)}, which are not loaded for safety)" if pickles else "") +
            "; save the model with save_pretrained (safetensors)")
    return p


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any, Path]:
    """(model, tokenizer, directory) for a causal LM; safetensors only, no remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_dir = resolve_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{model_dir}/config.json cannot be read ({str(e).splitlines()[0][:200]})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"{model_dir} holds a '{config.model_type}' model, not a causal language model")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        # Models saved with GPT-2's gelu_new run the same function through one fused op (see model.FAST_GELU).
        fast_gelu = {"activation_function": FAST_GELU} if getattr(config, "activation_function", None) == \
            "gelu_new" else {}
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, use_safetensors=True,
                                                     trust_remote_code=False, **fast_gelu)
    except Exception as e:  # noqa: BLE001 - corrupt or truncated weights, missing tokenizer files, ...
        cause = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"cannot load the model in {model_dir} ({cause}); is the directory complete?") from None
    model.to(dev).eval()
    if dev.type == "cpu" and config.model_type == "gpt2":
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
