"""Continuous batching for the server: one background thread decodes every running sequence in one forward pass.

Sequences that arrive while others decode join the batch before the next step: the new prompt is prefilled on
its own (its key/value states computed once), then its rows are merged into the batch's KV cache. Finished,
stopped or abandoned sequences leave the batch before the next step, so their slots are free at once.

Why our own scheduler rather than transformers' continuous batching (`init_continuous_batching`,
`generate_batch`, the engine of `transformers serve`): on CPU it was far slower than plain `model.generate`
(its paged-attention path is built for GPUs; measured: docs/experiments/serve-speed.md), and it samples with one
`do_sample` and one seed for the whole batch, where each request here has its own temperature (0: greedy),
top-k, top-p and seed. Run by `gpt2-dutch serve` (serve/app.py).

The batch's cache is transformers' DynamicCache with the rows aligned on the right: every row's newest token is
the last column, shorter rows are padded on the left and masked out, each row keeps its own position ids.

Per sequence, as the OpenAI API defines them and vLLM applies them: `logit_bias` is added to the logits and
`presence_penalty` / `frequency_penalty` subtract `presence * (count > 0) + frequency * count` (count: how often
the token was generated so far in this sequence) before sampling, greedy included. Log-probabilities, when asked
for, are of the model's own distribution (log_softmax of the raw fp32 logits, before bias, penalties and
temperature: vLLM's default "raw_logprobs"), so that a prompt scored here is scored as `evaluate` scores it; a
prompt whose tokens are scored (`echo` with `logprobs`) is prefilled alone, unpadded, with every position's logits.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class QueueFull(Exception):
    """More requests are waiting for a slot than --max-queue allows."""


@dataclass
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def adjusts(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


# One scored position: the log-probability of the token there, and the `logprobs` most likely tokens with theirs.
Scored = tuple[float, list[tuple[int, float]]]


@dataclass
class Sequence:
    """One continuation being generated (a request asks for len(prompts) x n of them).

    `emit(token_id, finish_reason)` is called from the engine thread: once per new token with finish_reason
    None, then once with token_id None and the reason ("length", "stop", "cancelled" or "error: ...").
    With `logprobs` set (0 and up: how many alternatives), `scored[k]` holds the k-th emitted token's Scored
    before it is emitted; with `score_prompt` too, `prompt_scored` holds one per prompt token after the first
    before the first emit. `max_new_tokens` 0 (scoring only) prefills the prompt and ends with "length".
    """

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    emit: Callable[[int | None, str | None], None]
    generator: torch.Generator | None = None
    ignore_eos: bool = False  # benchmarks: <|endoftext|> is a token like any other, the text goes on
    generated: int = 0
    last_token: int = -1
    cancelled: bool = False  # set by the server (client gone, stop string seen); read by the engine thread
    finished: bool = False
    logprobs: int | None = None  # None: no log-probabilities
    score_prompt: bool = False
    scored: list[Scored] = field(default_factory=list)
    prompt_scored: list[Scored] | None = None
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> times, for the penalties
    group: Any = None  # the request it belongs to (set by Engine.submit)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Group:
    """The sequences of one request: they enter the batch together (a prompt's n choices share one prefill)."""

    sequences: list[Sequence]
    enqueued: float = field(default_factory=time.perf_counter)


class Engine:
    """Owns the model; `submit` hands it the sequences of a request, a background thread does the rest."""

    def __init__(self, model: Any, eos_token_id: int | None, max_batch: int = 32, max_queue: int = 64,
                 after_step: Callable[[], None] = lambda: None):
        self.model = model
        self.after_step = after_step  # called by the engine thread after each step (the server flushes its events)
        self.eos = eos_token_id
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.device = model.device
        self._waiting: collections.deque[_Group] = collections.deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # The running batch: rows of `_rows`, the cache, and which cache columns hold a real token per row.
        self._rows: list[Sequence] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, columns] bool
        self._positions: torch.Tensor | None = None  # [rows] the position of each row's next input token
        self.steps = 0  # decoding steps run (each one a forward over the whole batch)
        self.step_rows = 0  # rows summed over those steps: step_rows / steps is the mean batch size
        self.busy_s = 0.0  # time spent in prefills and decoding steps

    # ------------------------------------------------------------------------------------------ server side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gpt2-dutch-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue a request's sequences; QueueFull when they must wait and --max-queue requests already do."""
        if len(sequences) > self.max_batch:  # the API refuses these first; a caller's bug otherwise
            raise ValueError(f"{len(sequences)} sequences can never fit a batch of {self.max_batch}")
        with self._lock:
            # --max-queue bounds the requests that must wait; one whose sequences fit the free slots starts at the
            # next step whatever the queue's bound (so that --max-queue 0 means "no waiting", not "no serving")
            pending = sum(len(g.sequences) for g in self._waiting)
            fits = sum(not s.finished for s in self._rows) + pending + len(sequences) <= self.max_batch
            if not fits and len(self._waiting) >= self.max_queue:
                raise QueueFull()
            group = _Group(sequences)
            for s in sequences:
                s.group = group
            self._waiting.append(group)
            self._lock.notify_all()

    def cancel(self, sequences: list[Sequence]) -> None:
        """Stop these sequences: a waiting request leaves the queue now, running ones leave the batch before the
        next step."""
        with self._lock:
            for s in sequences:
                s.cancelled = True
            gone = [g for g in self._waiting if all(s.cancelled for s in g.sequences)]
            self._waiting = collections.deque(g for g in self._waiting if all(g is not x for x in gone))
            self._lock.notify_all()
        for g in gone:
            for s in g.sequences:
                self._finish(s, "cancelled")
        if gone:
            self.after_step()

    def stats(self) -> dict[str, int]:
        with self._lock:
            live = [s for s in self._rows if not s.finished]
            return {"running": len(live), "running_requests": len({id(s.group) for s in live}),
                    "waiting": len(self._waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue, "steps": self.steps,
                    "mean_batch": round(self.step_rows / max(1, self.steps), 2), "busy_s": round(self.busy_s, 3)}

    # ------------------------------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stopping and not self._waiting and not self._rows:
                        self._lock.wait()
                    if self._stopping:
                        break
                    admitted = self._take_admissible()
                start = time.perf_counter()
                try:
                    if admitted:
                        self._admit(admitted)
                    self._drop_finished()
                    if self._rows:
                        self._decode_step()
                        self._drop_finished()
                except Exception as e:  # noqa: BLE001 - fail what is running, keep serving
                    self._fail_all(f"error: {type(e).__name__}: {str(e)[:200]}")
                self.after_step()
                self.busy_s += time.perf_counter() - start
        self._fail_all("cancelled")
        self.after_step()

    def _take_admissible(self) -> list[_Group]:
        """Whole requests, oldest first, while their sequences fit the free slots (caller holds the lock)."""
        taken = []
        free = self.max_batch - len(self._rows)
        while self._waiting and len(self._waiting[0].sequences) <= free:
            group = self._waiting.popleft()
            live = [s for s in group.sequences if not s.cancelled]
            for s in group.sequences:
                if s.cancelled:
                    self._finish(s, "cancelled")
            if live:
                taken.append(_Group(live, group.enqueued))
                free -= len(live)
        return taken

    def _admit(self, groups: list[_Group]) -> None:
        """Prefill the new requests; one that fails there (out of memory for a long prompt) fails alone: the
        running batch goes on."""
        try:
            self._prefill(groups)
        except Exception as e:  # noqa: BLE001
            running = {id(s) for s in self._rows}
            for g in groups:
                for s in g.sequences:
                    if id(s) not in running:
                        self._finish(s, f"error: {type(e).__name__}: {str(e)[:200]}")

    def _prefill(self, groups: list[_Group]) -> None:
        """Compute each distinct prompt's KV once, in one left-padded forward for all the newly admitted requests,
        pick each sequence's first token, and merge its rows into the batch. A prompt whose tokens are to be
        scored runs in a forward of its own, unpadded and with every position's logits, as `evaluate` runs it.

        One forward for 16 prompts instead of 16: requests that arrive together start together (16 concurrent
        20-token prompts of GPT-2 small: one prefill pass instead of sixteen memory-bound ones)."""
        by_prompt: dict[tuple[int, ...], list[Sequence]] = {}
        for group in groups:
            for s in group.sequences:
                by_prompt.setdefault(tuple(s.prompt_ids), []).append(s)
        scoring = [p for p, seqs in by_prompt.items() if any(s.score_prompt for s in seqs)]
        plain = [p for p in by_prompt if p not in set(scoring)]
        for p in scoring:
            self._prefill_rows([p], by_prompt, every_position=True)
        if plain:
            self._prefill_rows(plain, by_prompt, every_position=False)

    def _prefill_rows(self, prompts: list[tuple[int, ...]], by_prompt: dict[tuple[int, ...], list[Sequence]],
                      every_position: bool) -> None:
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        # Unpadded prompts need no mask (the causal one is implied): a lone prompt runs exactly as in generate.
        padded = any(len(p) < width for p in prompts)
        out = self.model(input_ids=ids.to(self.device), cache=cache, use_cache=True,
                         logits_to_keep=0 if every_position else 1,
                         attention_mask=mask.to(self.device) if padded else None,
                         position_ids=positions.to(self.device))
        logits = out.logits[:, -1, :].float()
        if every_position:  # one prompt, unpadded: position t's logits predict token t + 1
            k = max(s.logprobs or 0 for s in by_prompt[prompts[0]])
            prompt_scored = score(out.logits[0, :-1].float(), list(prompts[0][1:]), k)
            for s in by_prompt[prompts[0]]:
                if s.score_prompt:
                    s.prompt_scored = [(lp, top[:s.logprobs or 0]) for lp, top in prompt_scored]
        kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        for row, p in enumerate(prompts):
            seqs = by_prompt[p]
            for s in seqs:
                if s.max_new_tokens == 0:  # scoring only: nothing to generate
                    self._finish(s, "length")
            seqs = [s for s in seqs if not s.finished]
            if not seqs:
                continue
            raw = logits[row:row + 1].expand(len(seqs), -1)
            tokens = sample(adjust(raw, seqs), [s.sampling for s in seqs], [s.generator for s in seqs])
            self._merge([(k[row:row + 1, :, width - len(p):], v[row:row + 1, :, width - len(p):]) for k, v in kv],
                        len(p), seqs)
            self._score_next(raw, seqs, tokens)
            for s, t in zip(seqs, tokens, strict=True):
                self._accept(s, t)

    def _score_next(self, raw: torch.Tensor, rows: list[Sequence], tokens: list[int]) -> None:
        """Each row's Scored for its sampled token, for the rows that asked for log-probabilities."""
        wanted = [i for i, s in enumerate(rows) if s.logprobs is not None]
        if not wanted:
            return
        k = max(rows[i].logprobs for i in wanted)
        for i, entry in zip(wanted, score(raw[wanted], [tokens[i] for i in wanted], k), strict=True):
            rows[i].scored.append((entry[0], entry[1][:rows[i].logprobs]))

    def _merge(self, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int, seqs: list[Sequence]) -> None:
        """Append len(seqs) rows that share the prompt cache `kv` (batch 1, `length` columns) to the batch."""
        from transformers import DynamicCache

        n = len(seqs)
        new_mask = torch.ones((n, length), dtype=torch.bool, device=self.device)
        new_pos = torch.full((n,), length, dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
            for layer, (k, v) in zip(self._cache.layers, kv, strict=True):
                layer.update(k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous())
            self._mask, self._positions, self._rows = new_mask, new_pos, list(seqs)
            return
        width = self._mask.shape[1]
        pad_old, pad_new = max(0, length - width), max(0, width - length)
        for layer, (k, v) in zip(self._cache.layers, kv, strict=True):
            layer.keys = torch.cat([_pad_left(layer.keys, pad_old), _pad_left(k.expand(n, -1, -1, -1), pad_new)])
            layer.values = torch.cat([_pad_left(layer.values, pad_old), _pad_left(v.expand(n, -1, -1, -1), pad_new)])
        old_mask = torch.nn.functional.pad(self._mask, (pad_old, 0), value=False)
        new_mask = torch.nn.functional.pad(new_mask, (pad_new, 0), value=False)
        self._mask = torch.cat([old_mask, new_mask])
        self._positions = torch.cat([self._positions, new_pos])
        self._rows = self._rows + seqs  # a new list: stats() reads it from another thread

    def _decode_step(self) -> None:
        """One forward over every row: feed each row's last token, sample its next one."""
        rows = self._rows
        ids = torch.tensor([[s.last_token] for s in rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.bool, device=self.device)], dim=1)
        out = self.model(input_ids=ids, cache=self._cache, attention_mask=mask.long(),
                         position_ids=self._positions[:, None], use_cache=True)
        self._cache, self._mask = out.cache, mask
        self._positions = self._positions + 1
        self.steps += 1
        self.step_rows += len(rows)
        raw = out.logits[:, -1, :].float()
        tokens = sample(adjust(raw, rows), [s.sampling for s in rows], [s.generator for s in rows])
        self._score_next(raw, rows, tokens)
        for s, t in zip(rows, tokens, strict=True):
            if not s.finished:
                self._accept(s, t)

    def _accept(self, s: Sequence, token: int) -> None:
        if s.cancelled:
            self._finish(s, "cancelled")
        elif token == self.eos and not s.ignore_eos:
            self._finish(s, "stop")
        else:
            s.generated += 1
            s.last_token = token
            s.counts[token] = s.counts.get(token, 0) + 1
            s.emit(token, None)
            if s.generated >= s.max_new_tokens:
                self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str) -> None:
        if not s.finished:
            s.finished = True
            s.emit(None, reason)

    def _drop_finished(self) -> None:
        """Remove finished and cancelled rows from the batch, and the columns no remaining row uses."""
        for s in self._rows:
            if s.cancelled:
                self._finish(s, "cancelled")
        keep = [i for i, s in enumerate(self._rows) if not s.finished]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._positions = [], None, None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask[index]
        first = int(mask.any(dim=0).nonzero()[0])  # leading columns that are padding in every remaining row
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self._mask = mask[:, first:]
        self._positions = self._positions[index]
        self._rows = [self._rows[i] for i in keep]

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            waiting = [s for g in self._waiting for s in g.sequences]
            self._waiting.clear()
        for s in self._rows + waiting:
            self._finish(s, reason)
        self._rows, self._cache, self._mask, self._positions = [], None, None, None


def _pad_left(x: torch.Tensor, columns: int) -> torch.Tensor:
    """[rows, heads, T, dim] -> [rows, heads, columns + T, dim], zeros in front (masked out)."""
    return torch.nn.functional.pad(x, (0, 0, columns, 0)) if columns else x


def new_generator(seed: int | None) -> torch.Generator:
    """A sequence's own random stream: seeded ones repeat whatever else shares the batch."""
    return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))


def adjust(logits: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
    """The logits each row samples from: its logit_bias added, its presence and frequency penalties subtracted
    for the tokens it generated so far (OpenAI's definition). `logits` itself is left as it was (its
    log-probabilities are what a client is told)."""
    changed = [i for i, s in enumerate(rows) if s.sampling.adjusts()]
    if not changed:
        return logits
    out = logits.clone()
    for i in changed:
        s, settings = rows[i], rows[i].sampling
        if settings.logit_bias:
            ids = torch.tensor(list(settings.logit_bias), dtype=torch.long, device=out.device)
            out[i, ids] += torch.tensor(list(settings.logit_bias.values()), dtype=out.dtype, device=out.device)
        if s.counts and (settings.presence_penalty or settings.frequency_penalty):
            ids = torch.tensor(list(s.counts), dtype=torch.long, device=out.device)
            counts = torch.tensor(list(s.counts.values()), dtype=out.dtype, device=out.device)
            out[i, ids] -= settings.frequency_penalty * counts + settings.presence_penalty
    return out


def score(logits: torch.Tensor, tokens: list[int], k: int) -> list[Scored]:
    """Per row of fp32 `logits` [rows, vocab]: the log-probability of `tokens[row]` and the k most likely tokens
    with theirs (most likely first)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, dtype=torch.long, device=logprobs.device)[:, None])[:, 0]
    if k:
        top = torch.topk(logprobs, min(k, logprobs.shape[1]), dim=-1)
        top_ids, top_lps = top.indices.tolist(), top.values.tolist()
    else:
        top_ids = top_lps = [[] for _ in tokens]
    return [(lp, list(zip(ids, lps, strict=True))) for lp, ids, lps in zip(chosen.tolist(), top_ids, top_lps,
                                                                              strict=True)]


def sample(logits: torch.Tensor, settings: list[Sampling], generators: list[torch.Generator | None]) -> list[int]:
    """Next token per row of fp32 `logits` [rows, vocab], each row with its own temperature, top-k, top-p.

    Same processing order as transformers' generate (temperature, top-k, top-p); temperature 0 is greedy.
    """
    out = logits.argmax(dim=-1).tolist()
    sampled = [i for i, s in enumerate(settings) if s.temperature > 0]
    if not sampled:
        return out
    x = logits[sampled]
    x = x - x.max(dim=-1, keepdim=True).values  # <= 0: a tiny temperature gives -inf, never inf or NaN
    temps = torch.tensor([settings[i].temperature for i in sampled], dtype=x.dtype, device=x.device)
    x = x / temps[:, None]
    ks = [settings[i].top_k for i in sampled]
    if any(0 < k < x.shape[1] for k in ks):
        kmax = max(k if 0 < k < x.shape[1] else 1 for k in ks)
        top = torch.topk(x, kmax, dim=-1).values
        for row, k in enumerate(ks):
            if 0 < k < x.shape[1]:
                x[row][x[row] < top[row, k - 1]] = float("-inf")
    ps = torch.tensor([settings[i].top_p for i in sampled], dtype=x.dtype, device=x.device)
    if bool((ps < 1).any()):
        # transformers' TopPLogitsWarper: drop the least likely tokens whose mass stays within 1 - top_p
        sorted_x, order = torch.sort(x, descending=False, dim=-1)
        cumulative = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - ps)[:, None]
        remove[:, -1] = False  # always keep the most likely token
        x = x.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    # Inverse-CDF sampling: one uniform number per row from the row's own generator; torch.multinomial per row
    # was a large share of a decoding step (measured: docs/experiments/serve-speed.md).
    cdf = x.softmax(dim=-1).cumsum(dim=-1)
    # the generators live on the CPU (cheap to seed, the same draws on any device)
    u = torch.tensor([float(torch.rand((), generator=generators[i])) for i in sampled], dtype=cdf.dtype,
                     device=cdf.device)
    # right=True: the first token whose cumulative mass exceeds u, never one of probability 0
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[1] - 1)
    for row, i in enumerate(sampled):
        out[i] = int(picked[row, 0])
    return out
