"""Generate Dutch text with a trained model: prompts, a batch, an interactive REPL, or a speed benchmark.

    gpt2-dutch generate --model-path trained_models/gpt2-dutch-small-latest --prompt "Er was eens"
    gpt2-dutch generate --model-path M --prompt-file prompts.txt --greedy --json
    gpt2-dutch generate --model-path M --interactive          # /temp 0.7, /topk 40, /max 200, /help, /quit
    gpt2-dutch generate --model-path M --benchmark            # tokens/s at batch 1 and 16, latency

Uses transformers `generate` (KV cache, logits processors). One prompt streams to the terminal as it is
produced; several prompts run as one left-padded batch. Each prompt gets its own budget of new tokens,
min(--max-new-tokens, context - its length); a prompt longer than the context keeps its end. Both are said on
stderr, one line per prompt. Weights load from safetensors only; remote code never runs.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import option
from .devices import cpu_has_fast_bf16
from .errors import UsageError, check, check_number, check_seed
from .model import FAST_GELU

DEFAULT_PROMPTS = ["Amsterdam is een stad", "Het weer in Nederland", "Er was eens een"]
# Each sample is a row of the batch (and of the KV cache): these bounds keep a typo from asking for billions.
MAX_RETURN_SEQUENCES = 1000
MAX_BENCHMARK_BATCH = 4096


@dataclass
class GenerateConfig:
    model_path: str = option("trained_models/gpt2-dutch-small-latest/final_model",
                             "a final_model directory, a run directory, or a *-latest link")
    prompt: list[str] = option([], "a prompt (repeatable); default: three Dutch prompts")
    prompt_file: str | None = option(None, "a file with one prompt per line")
    interactive: bool = option(False, "a REPL: type prompts, change settings with /commands")
    benchmark: bool = option(False, "measure tokens/s (batch 1 and --benchmark-batch), time to first token, latency")
    benchmark_batch: int = option(16, "the larger batch size of --benchmark")
    max_new_tokens: int = option(100, "tokens to generate per prompt (at most the context minus the prompt's "
                                      "length; a capped prompt is named on stderr)")
    temperature: float = option(0.8, "sampling temperature")
    top_k: int = option(50, "sample from the k most likely tokens (0: off)")
    top_p: float = option(0.95, "nucleus sampling: smallest set with this probability mass (1: off)")
    repetition_penalty: float = option(1.0, "> 1 discourages repeating tokens")
    num_return_sequences: int = option(1, "samples per prompt")
    greedy: bool = option(False, "always take the most likely token (deterministic)")
    seed: int | None = option(None, "seed for reproducible sampling")
    device: str = option("auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)")
    dtype: str = option("auto", "auto: bf16 on GPUs and CPUs with fast bf16, else fp32",
                        choices=["auto", "bf16", "fp16", "fp32"])
    json: bool = option(False, "print results as JSON")

    def __post_init__(self) -> None:
        # A huge --max-new-tokens or --top-k needs no upper bound: each is capped by the context or the vocabulary.
        check(self.max_new_tokens > 0, f"--max-new-tokens must be positive (got {self.max_new_tokens})")
        check_number(self.temperature, "--temperature")  # argparse takes inf and nan for floats
        check(self.temperature > 0, f"--temperature must be positive (got {self.temperature}); use --greedy")
        check(self.top_k >= 0, f"--top-k must be >= 0 (got {self.top_k})")
        check_number(self.top_p, "--top-p")
        check(0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p})")
        check_number(self.repetition_penalty, "--repetition-penalty")
        check(self.repetition_penalty > 0, f"--repetition-penalty must be positive (got {self.repetition_penalty})")
        check(0 < self.num_return_sequences <= MAX_RETURN_SEQUENCES, "--num-return-sequences must be between 1 "
              f"and {MAX_RETURN_SEQUENCES} (got {self.num_return_sequences})")
        check(0 < self.benchmark_batch <= MAX_BENCHMARK_BATCH, f"--benchmark-batch must be between 1 and "
              f"{MAX_BENCHMARK_BATCH} (got {self.benchmark_batch})")
        check_seed(self.seed)


# ------------------------------------------------------------------------------------------ loading

CPU_ATTENTION = "gpt2_dutch_cpu_decode"


def cpu_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA for the prompt, plain matmul + softmax for the one-token decoding steps on CPU.

    Why: PyTorch's CPU flash-attention kernel costs ~0.6 ms per layer per step for a single query, more than the
    attention maths itself; the plain path made batch-16 decoding of small 10% faster (343 vs 311 tokens/s,
    bf16, 2 cores, median of 4 alternating runs) and batch 1 no slower. The mask is SDPA's boolean one.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2), None


def _use_cpu_decode_attention(model: Any) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CPU_ATTENTION, cpu_decode_attention)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)
    model.set_attn_implementation(CPU_ATTENTION)


class PackedLinear(torch.nn.Module):
    """An inference-only linear layer whose bf16 weight is prepacked once into oneDNN's blocked layout.

    Why: for the one-row matmuls of batch-1 decoding, PyTorch's bf16 addmm re-lays-out the weight on every call
    and streams GPT-2's 768x3072 weights at 15.6 GB/s on the 2-core dev CPU; the prepacked kernel (the one
    torch.compile's weight freezing uses) reaches 23.6 GB/s, and 0.28 vs 0.47 ms at 16 rows, with bit-identical
    results (measured on 24 distinct weights, out of cache). The packed weight is not a parameter: a model
    with packed layers is for generation and evaluation, not for training or saving.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, counted: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        self.counted = counted  # False for a tied LM head: its weight is the token embedding, counted there

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_cpu_linears(model: Any) -> int:
    """Swap a CPU bf16 model's linear layers (GPT-2's Conv1D, nn.Linear) for PackedLinear; returns how many.

    Leaves the model as it is where oneDNN has no bf16 support, where the ops fail, or where a packed layer does
    not reproduce the plain one on a test input.
    """
    from transformers.pytorch_utils import Conv1D

    if not (hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return 0
    swaps: list[tuple[torch.nn.Module, str, PackedLinear]] = []
    embedding = model.get_input_embeddings().weight.data_ptr()
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Conv1D):  # GPT-2 stores x @ W as an [in, out] weight
                weight, bias = child.weight.t(), child.bias
            elif type(child) is torch.nn.Linear:
                weight, bias = child.weight, child.bias
            else:
                continue
            if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
                continue
            # A private generator: loading a model must not move the global RNG that --seed sets.
            x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).bfloat16()
            try:  # private PyTorch ops (what inductor uses): a version that changed them keeps the plain model
                packed = PackedLinear(weight, bias, counted=weight.data_ptr() != embedding)
                with torch.no_grad():
                    same = torch.allclose(packed(x).float(), child(x).float(), rtol=1e-2, atol=1e-2)
            except (RuntimeError, TypeError):
                return 0
            if not same:
                return 0
            swaps.append((parent, name, packed))
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    return len(swaps)


def parameter_count(model: Any) -> int:
    """The model's parameters, packed layers included."""
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear) and m.counted)
    return sum(p.numel() for p in model.parameters()) + packed


def resolve_model_dir(path: str | Path) -> Path:
    """A final_model directory, a run directory (-> its final_model), or a -latest link."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"model path {p} does not exist; train one with `gpt2-dutch train` or pass --model-path")
    if not (p / "config.json").is_file() and (p / "final_model").is_dir():
        p = p / "final_model"
    if not (p / "config.json").is_file():
        raise UsageError(f"{p} is not a model directory (no config.json); pass a final_model or run directory")
    weights = list(p.glob("*.safetensors")) + list(p.glob("*.safetensors.index.json"))
    if not weights:
        pickles = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        raise UsageError(f"{p} has no safetensors weights" + (
            f" (only {', '.join(pickles)}, which are not loaded for safety)" if pickles else "") +
            "; save the model with save_pretrained (safetensors)")
    return p


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown --device '{device}'; use cpu, cuda or cuda:N") from None
    check(dev.type != "cuda" or torch.cuda.is_available(), f"--device {device}: no CUDA GPU is available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
        return torch.bfloat16 if fast_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


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


# ------------------------------------------------------------------------------------------ generation

def generation_kwargs(cfg: GenerateConfig, tokenizer: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                          "eos_token_id": tokenizer.eos_token_id, "repetition_penalty": cfg.repetition_penalty,
                          "num_return_sequences": cfg.num_return_sequences}
    if cfg.greedy:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kw.update(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
    return kw


def context_length(model: Any) -> int | None:
    """The model's position table (GPT-2: n_positions), or None for a model without one."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


@dataclass
class PromptPlan:
    """How one prompt fits the model's context: the tokens it keeps and its own budget of new tokens."""

    ids: list[int]  # the tokens given to the model: the prompt's end where it was longer than the context
    prompt_tokens: int  # the whole prompt's tokens
    max_new_tokens: int  # min(--max-new-tokens, context - len(ids))
    requested: int  # --max-new-tokens

    @property
    def dropped(self) -> int:
        return self.prompt_tokens - len(self.ids)

    def notice(self, context: int, label: str = "the prompt") -> str | None:
        """One line saying what was truncated or capped, or None where the prompt got what was asked."""
        if not self.dropped and self.max_new_tokens == self.requested:
            return None
        tokens = "token" if self.max_new_tokens == 1 else "tokens"
        budget = f"gets {self.max_new_tokens} new {tokens}, not {self.requested} (--max-new-tokens)"
        if self.dropped:
            return (f"{label} ({self.prompt_tokens} tokens) is longer than the model's {context}-token context: "
                    f"its first {self.dropped} tokens were dropped, its last {len(self.ids)} kept; it {budget}")
        return f"{label} ({self.prompt_tokens} tokens) {budget}: the model's context is {context} tokens"

    def as_json(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "dropped_tokens": self.dropped,
                "max_new_tokens": self.max_new_tokens}


def plan_prompts(tokenizer: Any, prompts: list[str], context: int | None, max_new_tokens: int) -> list[PromptPlan]:
    """Tokenize each prompt, keep its end where it is longer than the context, and give it its own budget."""
    check(context is None or context >= 2, f"the model's context ({context} tokens) leaves no room to generate")
    bos = tokenizer.bos_token or tokenizer.eos_token
    # An empty prompt starts from <|endoftext|>, the document boundary the model was trained on.
    texts = [p if p else bos for p in prompts]
    # verbose=False: a prompt longer than the tokenizer's model_max_length is ours to report, in one line
    encoded = tokenizer(texts, verbose=False)["input_ids"] if texts else []
    keep = context - 1 if context else None  # room for at least one new token
    plans = []
    for ids in encoded:
        kept = ids[-keep:] if keep and len(ids) > keep else ids
        budget = min(max_new_tokens, context - len(kept)) if context else max_new_tokens
        plans.append(PromptPlan(list(kept), len(ids), budget, max_new_tokens))
    return plans


@torch.inference_mode()
def generate_texts(model: Any, tokenizer: Any, prompts: list[str], cfg: GenerateConfig,
                   streamer: Any = None, plans: list[PromptPlan] | None = None) -> list[list[str]]:
    """Continuations (without the prompt) per prompt; stops at <|endoftext|>.

    Each prompt gets its own budget of new tokens (see plan_prompts). Prompts that share a budget run as one
    left-padded batch: the common case, where every prompt fits, is a single batch; a prompt whose budget the
    context caps runs with the others of its length, so that a long prompt never shortens the rest.
    """
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    if plans is None:
        plans = plan_prompts(tokenizer, prompts, context_length(model), cfg.max_new_tokens)
    if len(plans) != len(prompts):  # a caller's bug, not the user's: keeps its traceback
        raise ValueError(f"{len(plans)} prompt plans for {len(prompts)} prompts")
    groups: dict[int, list[int]] = {}
    for i, plan in enumerate(plans):
        groups.setdefault(plan.max_new_tokens, []).append(i)
    kwargs = generation_kwargs(cfg, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = cfg.num_return_sequences
    results: list[list[str]] = [[] for _ in prompts]
    for budget in sorted(groups, reverse=True):  # a fixed order: seeded sampling is reproducible
        members = groups[budget]
        width = max(len(plans[i].ids) for i in members)
        ids = torch.full((len(members), width), pad, dtype=torch.long)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        for row, i in enumerate(members):  # left padding: every prompt ends where generation starts
            p = plans[i].ids
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        out = _generate(model, {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)},
                        {**kwargs, "max_new_tokens": budget}, streamer, cfg)
        decoded = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for row, i in enumerate(members):
            results[i] = decoded[row * n:(row + 1) * n]
    return results


def _generate(model: Any, enc: dict[str, torch.Tensor], kwargs: dict[str, Any], streamer: Any,
              cfg: GenerateConfig) -> torch.Tensor:
    """model.generate, with running out of memory and overflowing probabilities as one-line errors."""
    rows = enc["input_ids"].shape[0] * cfg.num_return_sequences
    try:
        return model.generate(**enc, **kwargs, streamer=streamer)
    except torch.OutOfMemoryError:
        raise UsageError(f"out of memory generating {rows} sequences of up to {kwargs['max_new_tokens']} tokens on "
                         f"{model.device}; use fewer prompts, --num-return-sequences or --max-new-tokens") from None
    except RuntimeError as e:
        if "can't allocate memory" in str(e) or "not enough memory" in str(e):  # CPU allocators say it so
            raise UsageError(f"out of memory generating {rows} sequences of up to {kwargs['max_new_tokens']} "
                             "tokens; use fewer prompts, --num-return-sequences or --max-new-tokens") from None
        if "probability tensor contains" in str(e):
            # A tiny temperature or repetition penalty divides the logits into infinities: no distribution.
            raise UsageError(f"sampling failed: --temperature {cfg.temperature} and --repetition-penalty "
                             f"{cfg.repetition_penalty} push the logits to infinity; use values nearer 1, or "
                             "--greedy") from None
        raise


def print_notices(plans: list[PromptPlan], context: int | None, stream: Any = None, single: bool = False) -> None:
    """One stderr line per prompt that was truncated or whose budget was capped."""
    for i, plan in enumerate(plans):
        line = plan.notice(context or 0, "the prompt" if single else f"prompt {i + 1}")
        if line:
            print(f"gpt2-dutch generate: note: {line}", file=stream or sys.stderr, flush=True)


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        check(not path.is_dir(), f"prompt file {path} is a directory; give a text file with one prompt per line")
        check(path.is_file(), f"prompt file {path} not found")
        try:
            lines = path.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            line = path.read_bytes()[:e.start].count(b"\n") + 1
            raise UsageError(f"prompt file {path} is not UTF-8 text (line {line}: byte 0x{e.object[e.start]:02x}); "
                             "convert it with e.g. `iconv -t utf-8`") from None
        except OSError as e:
            raise UsageError(f"prompt file {path} cannot be read ({e.strerror})") from None
        from_file = [line for line in lines if line.strip()]
        check(bool(from_file), f"prompt file {path} holds no prompts (blank lines are skipped)")
        prompts += from_file
    return prompts or list(DEFAULT_PROMPTS)


def generate(cfg: GenerateConfig) -> Any:
    model, tokenizer, model_dir = load_model(cfg.model_path, cfg.device, cfg.dtype)
    if cfg.benchmark:
        result = run_benchmark(model, tokenizer, cfg)
        print(json.dumps(result, indent=2) if cfg.json else print_benchmark(result))
        return result
    if cfg.interactive:
        from .interactive import repl

        return repl(model, tokenizer, cfg, sys.stdin, sys.stdout)
    prompts = read_prompts(cfg)
    context = context_length(model)
    plans = plan_prompts(tokenizer, prompts, context, cfg.max_new_tokens)
    print_notices(plans, context, single=len(prompts) == 1)
    if cfg.json:
        results = generate_texts(model, tokenizer, prompts, cfg, plans=plans)
        print(json.dumps([{"prompt": p, "completions": c, **plan.as_json()}
                          for p, c, plan in zip(prompts, results, plans, strict=True)], ensure_ascii=False, indent=2))
        return results
    from transformers import TextStreamer

    results = []
    for prompt, plan in zip(prompts, plans, strict=True) if cfg.num_return_sequences == 1 and len(prompts) <= 3 \
            else []:
        print(f"\n>>> {prompt}", end="", flush=True)  # stream each prompt's text as it is produced
        results += generate_texts(model, tokenizer, [prompt], cfg, TextStreamer(tokenizer, skip_prompt=True,
                                                                                  skip_special_tokens=True),
                                  plans=[plan])
    if not results:  # many prompts: one batch is much faster than streaming them one by one
        results = generate_texts(model, tokenizer, prompts, cfg, plans=plans)
        for prompt, completions in zip(prompts, results, strict=True):
            for c in completions:
                print(f"\n>>> {prompt}{c}")
    return results


# ------------------------------------------------------------------------------------------ benchmark

class _TokenClock:
    """A generate() streamer that only timestamps each step: put() is called once per generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def _timed_generate(model: Any, enc: dict[str, torch.Tensor], new_tokens: int, pad_id: int) -> dict[str, Any]:
    clock = _TokenClock()
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    # min_new_tokens = max_new_tokens: every run produces exactly the same number of tokens (EOS ignored)
    model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=pad_id, streamer=clock if enc["input_ids"].shape[0] == 1 else None)
    sync()  # generate may return before the GPU has finished its last kernels
    total = time.perf_counter() - start
    result: dict[str, Any] = {"seconds": total}
    if clock.times:  # times[0] is the prompt being "put"; times[1] the first generated token
        result["ttft_s"] = clock.times[1] - start
        result["latencies_s"] = [b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False)]
    return result


def run_benchmark(model: Any, tokenizer: Any, cfg: GenerateConfig, prompt_tokens: int = 32,
                  repeats: int = 3) -> dict[str, Any]:
    """Decode speed at batch 1 and at a larger batch, after a warm-up run (not counted)."""
    torch.manual_seed(0)
    ctx = model.config.n_positions
    prompt_tokens = min(prompt_tokens, max(1, ctx // 4))
    new = min(cfg.max_new_tokens, ctx - prompt_tokens)
    check(new > 0, f"the model's context ({ctx}) is too short for a {prompt_tokens}-token benchmark prompt")
    vocab = model.config.vocab_size
    out: dict[str, Any] = {"device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
                           "parameters": parameter_count(model), "prompt_tokens": prompt_tokens,
                           "new_tokens": new, "threads": torch.get_num_threads()}
    for batch in sorted({1, cfg.benchmark_batch}):
        ids = torch.randint(0, vocab, (batch, prompt_tokens), device=model.device)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        _timed_generate(model, enc, min(new, 8), tokenizer.eos_token_id)  # warm-up
        runs = [_timed_generate(model, enc, new, tokenizer.eos_token_id) for _ in range(repeats)]
        secs = statistics.median(r["seconds"] for r in runs)
        entry: dict[str, Any] = {"tokens_per_s": batch * new / secs, "seconds": secs}
        if batch == 1:
            lat = sorted(x for r in runs for x in r["latencies_s"])
            entry.update(ttft_ms=1000 * statistics.median(r["ttft_s"] for r in runs),
                         latency_p50_ms=1000 * lat[len(lat) // 2], latency_p90_ms=1000 * lat[int(len(lat) * 0.9)])
        out[f"batch_{batch}"] = entry
    if cfg.benchmark_batch != 1:
        out["batch_speedup"] = out[f"batch_{cfg.benchmark_batch}"]["tokens_per_s"] / out["batch_1"]["tokens_per_s"]
    return out


def print_benchmark(r: dict[str, Any]) -> str:
    lines = [f"device {r['device']}, {r['dtype']}, {r['parameters'] / 1e6:.1f}M parameters, {r['threads']} threads,"
             f" {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens (median of 3, warm-up excluded)",
             f"{'batch':>6} {'tokens/s':>10} {'TTFT ms':>9} {'p50 ms/token':>13} {'p90 ms/token':>13}"]
    for key in sorted((k for k in r if k.startswith("batch_") and k != "batch_speedup"),
                      key=lambda k: int(k.split("_")[1])):
        e = r[key]
        extra = (f"{e['ttft_ms']:>9.1f} {e['latency_p50_ms']:>13.2f} {e['latency_p90_ms']:>13.2f}"
                 if "ttft_ms" in e else f"{'':>9} {'':>13} {'':>13}")
        lines.append(f"{key.split('_')[1]:>6} {e['tokens_per_s']:>10.1f} {extra}")
    if "batch_speedup" in r:
        lines.append(f"batch speed-up over batch 1: {r['batch_speedup']:.1f}x")
    return "\n".join(lines)
