"""Continuations for a list of prompts with transformers' `generate`: per-prompt budgets, left-padded batches.

Used by the `generate` command, its REPL and the demo; settings come from any object with the sampling fields
of `SamplingSettings` (GenerateConfig is one).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gpt2_dutch.core.errors import UsageError, check
from gpt2_dutch.model.loading import context_length


class SamplingSettings(Protocol):
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    num_return_sequences: int
    greedy: bool
    seed: int | None


def generation_kwargs(cfg: SamplingSettings, tokenizer: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                          "eos_token_id": tokenizer.eos_token_id, "repetition_penalty": cfg.repetition_penalty,
                          "num_return_sequences": cfg.num_return_sequences}
    if cfg.greedy:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kw.update(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
    return kw


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
def generate_texts(model: Any, tokenizer: Any, prompts: list[str], cfg: SamplingSettings,
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
              cfg: SamplingSettings) -> torch.Tensor:
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
