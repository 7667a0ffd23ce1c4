"""The HTTP side: FastAPI routes in the OpenAI completions format over the batching engine, and the playground page.

    POST /v1/completions   prompt (string or list), max_tokens, temperature, top_p, n, stop, seed, stream, echo,
                           logprobs, presence_penalty, frequency_penalty, logit_bias; extensions: top_k, ignore_eos
    GET  /v1/models        the one model served; GET /v1/models/{id} that one model, 404 for any other id
    GET  /v1/model_card    size, training tokens, eval loss, bits per byte, loss curve (for the playground)
    POST /tokenize         vLLM's: text -> token ids; POST /detokenize: token ids -> text
    GET  /metrics          Prometheus text format: requests running and waiting, tokens, TTFT and latency
    *    /v1/chat/completions  a one-line 404: a base model has no chat endpoint
    GET  /health           liveness and the engine's load; never needs the API key
    GET  /                 the playground (a static page; it asks for the key where one is set)

Every route answers only the Host names it is given (`HostCheck`); POST needs the JSON content type; a body is
parsed and its prompts tokenized in a worker thread, not on the event loop that streams everyone's tokens.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request, imported inside
# create_app to keep `--help` light) at definition time.
import asyncio
import contextlib
import hmac
import json
import re
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

from gpt2_dutch.serve import LOOPBACK_HOSTS
from gpt2_dutch.serve.engine import Engine, QueueFull, Sampling, Scored, Sequence, new_generator
from gpt2_dutch.serve.metrics import Metrics
from gpt2_dutch.serve.protocol import (
    ApiError,
    CompletionRequest,
    error_body,
    parse_body,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
    read_body,
)

SHOWN_CHARS = 80  # of a client's value echoed in an error


class StopMatcher:
    """The first place where one of a few stop strings occurs in a text fed piece by piece, in time linear in the
    text: one Knuth-Morris-Pratt automaton per stop string, each fed every character once, never a rescan of what
    came before. `partial()` is the longest start of a stop string the text now ends with (to be held back)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.fail = [_failure(s) for s in stops]
        self.state = [0] * len(stops)  # per stop: how many of its first characters the text now ends with
        self.fed = 0

    def feed(self, text: str) -> int | None:
        """Where (in all the text fed) the first stop string to complete starts; None while none has."""
        for ch in text:
            self.fed += 1
            start = None
            for i, stop in enumerate(self.stops):
                k, fail = self.state[i], self.fail[i]
                while k and stop[k] != ch:
                    k = fail[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):
                    start = min(start, self.fed - k) if start is not None else self.fed - k
                    k = fail[k - 1]
                self.state[i] = k
            if start is not None:
                return start
        return None

    def partial(self) -> int:
        return max(self.state, default=0)


def _failure(s: str) -> list[int]:
    """KMP's failure function: fail[i] is the longest proper prefix of s[:i+1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class TextStream:
    """Token ids -> text deltas for one choice: waits for complete UTF-8 characters, holds back text that may be
    the start of a stop string, and cuts the text at the first stop string. Streamed deltas and the whole text of
    a non-streamed answer come from this one path, so they always agree."""

    def __init__(self, tokenizer: Any, stops: list[str], skip_special: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.matcher = StopMatcher(stops) if stops else None
        self.ids: list[int] = []
        self.prefix = self.read = 0  # decode ids[prefix:] and keep what ids[prefix:read] did not already give
        self.text = ""  # the text decoded so far
        self.sent = 0  # how much of it was released
        self.cut: int | None = None  # where the first stop string starts, once one has been seen
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def _append(self, new: str) -> None:
        self.text += new
        if self.matcher is not None and self.cut is None:
            self.cut = self.matcher.feed(new)

    def add(self, token: int) -> str:
        if self.stopped:  # tokens made before the engine saw the cancel: not part of the answer
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # a character still incomplete: wait
            self._append(now[len(before):])
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once no token follows (an incomplete character decodes as U+FFFD)."""
        if not self.stopped:
            before = self._decode(self.ids[self.prefix:self.read])
            self._append(self._decode(self.ids[self.prefix:])[len(before):])
            self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.cut is not None:
            cut = self.cut
            delta, self.text, self.sent, self.stopped = self.text[self.sent:cut], self.text[:cut], cut, True
            return delta
        hold = 0 if final or self.matcher is None else self.matcher.partial()
        end = max(self.sent, len(self.text) - hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta


class Outbox:
    """Events from the engine thread to the event loop, handed over once per decoding step: one wake-up of the
    loop per step instead of one per token (16 streams: 16x fewer cross-thread calls)."""

    def __init__(self) -> None:
        self._items: list[tuple[Any, asyncio.Queue, tuple]] = []
        self._lock = threading.Lock()

    def put(self, loop: Any, queue: asyncio.Queue, event: tuple) -> None:
        with self._lock:
            self._items.append((loop, queue, event))

    def flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        by_loop: dict[Any, list[tuple[asyncio.Queue, tuple]]] = {}
        for loop, queue, event in items:
            by_loop.setdefault(loop, []).append((queue, event))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody is waiting any more
                loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, event in batch:
        queue.put_nowait(event)


class Server:
    """The model, tokenizer and engine behind the routes."""

    def __init__(self, model: Any, tokenizer: Any, model_dir: Path, name: str, max_batch: int, max_queue: int,
                 api_key: str | None = None):
        from gpt2_dutch.model.cpu_kernels import parameter_count
        from gpt2_dutch.model.loading import context_length
        from gpt2_dutch.serve.card import model_card

        self.model, self.tokenizer, self.name, self.api_key = model, tokenizer, name, api_key
        self.context = context_length(model)
        self.outbox = Outbox()
        self.engine = Engine(model, tokenizer.eos_token_id, max_batch=max_batch, max_queue=max_queue,
                             after_step=self.outbox.flush)
        self.card = model_card(model_dir, parameter_count(model), name)
        self.created = int(model_dir.stat().st_mtime)
        self.vocab = model.config.vocab_size  # the logits' width: ids a request may name (a packed head has no .weight)
        self.metrics = Metrics(self.engine)
        self._token_text: dict[int, str] = {}
        # No token stands for more characters than its vocabulary entry has (a byte-level BPE entry has one
        # character per byte): a prompt longer than context x the longest entry cannot fit, and is refused
        # without being tokenized.
        longest = max(map(len, tokenizer.get_vocab()), default=0)
        self.max_prompt_chars = self.context * longest if self.context and longest else None

    # ------------------------------------------------------------------------------------------- requests

    def plan(self, req: CompletionRequest) -> list[list[int]]:
        """Each prompt's token ids; ApiError where the request cannot fit the batch, or a prompt and its
        max_tokens the context. Checked in the order of their cost: the batch, the prompts' characters, and only
        then tokens (run it in a worker thread: tokenizing is the costly part)."""
        rows = len(req.prompts) * req.n
        if rows > self.engine.max_batch:
            raise ApiError(f"{len(req.prompts)} prompts x n={req.n} asks for {rows} sequences; this server decodes at "
                           f"most {self.engine.max_batch} at once (--batch-size)", "n")
        label = "the prompt" if len(req.prompts) == 1 else "prompt {}"
        if self.max_prompt_chars:
            for i, p in enumerate(req.prompts):
                if len(p) > self.max_prompt_chars:  # certainly more tokens than the context holds
                    raise ApiError(f"{label.format(i)} has {len(p)} characters; this model's context is "
                                   f"{self.context} tokens, which no text over {self.max_prompt_chars} characters "
                                   "fits; shorten the prompt", "prompt", code="context_length_exceeded")
        bad = next((t for t in req.logit_bias or {} if t >= self.vocab), None)
        if bad is not None:
            raise ApiError(f"'logit_bias' names token {bad}, which is not in this model's vocabulary (0 to "
                           f"{self.vocab - 1})", "logit_bias")
        ids = self.tokenizer(req.prompts, verbose=False)["input_ids"]
        for i, p in enumerate(ids):
            if not p:
                raise ApiError(f"{label.format(i)} has no tokens", "prompt")
            if self.context and len(p) + req.max_tokens > self.context:
                raise ApiError(f"this model's context is {self.context} tokens, but {label.format(i)} has {len(p)} "
                               f"tokens and max_tokens is {req.max_tokens}; shorten the prompt or lower max_tokens",
                               "max_tokens" if len(p) < self.context else "prompt", code="context_length_exceeded")
        return ids

    def token_text(self, token: int) -> str:
        """A token as the logprobs fields name it: its text, or where it is only part of a character's UTF-8
        bytes, 'bytes:\\xNN...' as OpenAI names such tokens (as text they would all be U+FFFD, and collide as keys
        of top_logprobs)."""
        text = self._token_text.get(token)
        if text is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            if "\ufffd" in text:
                raw = self.tokenizer.convert_ids_to_tokens(token) or ""
                if raw and all(c in _BYTE_OF for c in raw):  # a byte-level BPE token: its bytes are known
                    data = bytes(_BYTE_OF[c] for c in raw)
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError:
                        text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            self._token_text[token] = text
        return text

    def prompt_offsets(self, ids: list[int]) -> list[int]:
        """Where each prompt token starts in the prompt's text (the characters decoded before it)."""
        stream, offsets = TextStream(self.tokenizer, [], skip_special=False), []
        for token in ids:
            offsets.append(len(stream.text))
            stream.add(token)
        return offsets

    def start(self, req: CompletionRequest, ids: list[list[int]], ignore_eos: bool
              ) -> tuple[list[Sequence], asyncio.Queue]:
        """Queue the request's sequences (choice i*n+j: prompt i, sample j); their events arrive on the queue."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        seqs = []
        for i, prompt in enumerate(ids):
            for j in range(req.n):
                index = i * req.n + j

                def emit(token: int | None, reason: str | None, index: int = index) -> None:
                    self.outbox.put(loop, events, (index, token, reason))

                seed = None if req.seed is None else (req.seed + index) % 2**64
                sampling = Sampling(req.temperature, req.top_k, req.top_p, seed, req.presence_penalty,
                                    req.frequency_penalty, req.logit_bias or {})
                seqs.append(Sequence(prompt, req.max_tokens, sampling, emit,
                                     generator=new_generator(seed) if req.temperature > 0 else None,
                                     ignore_eos=ignore_eos, logprobs=req.logprobs,
                                     score_prompt=req.echo and req.logprobs is not None))
        try:
            self.engine.submit(seqs)
        except QueueFull:
            raise ApiError(f"the server is busy: {self.engine.max_queue} requests are already waiting (--max-queue); "
                           "retry shortly", status=503, kind="server_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        self.metrics.prompt_tokens.inc(sum(len(p) for p in ids))
        return seqs, events


def _byte_of() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a BPE token uses for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_of()


class HostCheck:
    """ASGI middleware: only requests whose Host header names one of `allowed` reach the app ('*': any), so that
    a web page on another name that resolves to this machine (DNS rebinding) gets nothing from it. Starlette's
    TrustedHostMiddleware decides; its plain-text refusal is replaced by our one-line error body that names the
    flag to pass."""

    def __init__(self, app: Any, allowed: list[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        passed = False

        async def allowed(scope: Any, receive: Any, send: Any) -> None:
            nonlocal passed
            passed = True

        async def swallow(message: Any) -> None:  # the middleware's own refusal: replaced below
            pass

        await TrustedHostMiddleware(allowed, allowed_hosts=self.allowed, www_redirect=False)(scope, receive, swallow)
        if passed:
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse

        host = Headers(scope=scope).get("host")
        shown = "no Host header" if host is None else f"Host '{_short(host)}'"
        names = ", ".join(self.allowed)
        await JSONResponse(error_body(f"{shown} is not a name this server answers to ({names}); to reach it by "
                                      "another name, start it with --allowed-hosts NAME", code="host_not_allowed"),
                           status_code=400)(scope, receive, send)


def _short(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


# an absolute path inside a message (a library's error text): /x/y, ~/x, C:\x; a URL's // and "a / b" are not
_PATH = re.compile(r"(?<![\w.:/\\~])(?:~|[A-Za-z]:)?[/\\][\w.~-][^\s'\"(),;\[\]]*")


def public(message: str) -> str:
    """A message fit for a client: no local path (a library's error may name its own files or ours)."""
    return _PATH.sub("<path>", message)


def is_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"


def create_app(server: Server, allowed_hosts: list[str] | tuple[str, ...] = LOOPBACK_HOSTS) -> Any:
    """The FastAPI app; `allowed_hosts` are the Host names it answers to ('*': any)."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = FastAPI(title="gpt2-dutch", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HostCheck, allowed=list(allowed_hosts))

    def authorized(request: Request) -> None:
        if server.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), server.api_key.encode()):
            raise ApiError("a valid API key is required: send the header 'Authorization: Bearer KEY'", status=401,
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:  # logged by uvicorn, not sent
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **server.engine.stats()}

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8"))

    def model_object() -> dict[str, Any]:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "gpt2-dutch"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != server.name:
            raise ApiError(f"the model '{_short(model_id)}' does not exist; this server serves '{server.name}'",
                           "model", status=404, code="model_not_found")
        return model_object()

    @app.get("/v1/model_card", dependencies=[Depends(authorized)])
    async def card() -> dict[str, Any]:
        return server.card

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.api_route("/v1/chat/completions", methods=["GET", "POST"])
    async def chat() -> None:
        raise ApiError(f"'{server.name}' is a base model with no chat template, so this server has no "
                       "/v1/chat/completions; send the text to continue to /v1/completions", status=404,
                       code="chat_not_supported")

    async def json_body(request: Request) -> bytes:
        # A body a web page can send to any address without asking first (a CORS "simple request": text/plain,
        # a form, no type) never runs anything: the JSON content type needs a preflight, which we never grant.
        content_type = request.headers.get("content-type", "")
        if not is_json(content_type):
            got = f"'{_short(content_type)}'" if content_type else "none"
            raise ApiError(f"the request body must be JSON sent with 'Content-Type: application/json' (got {got})",
                           status=415, code="unsupported_media_type")
        return await read_body(request)

    def prepare(raw: bytes) -> tuple[CompletionRequest, list[list[int]], bool, list[list[int]] | None]:
        body = parse_body(raw)
        req = parse_completion(body)
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError("'ignore_eos' must be true or false", "ignore_eos")
        ids = server.plan(req)
        offsets = [server.prompt_offsets(p) for p in ids] if req.echo and req.logprobs is not None else None
        return req, ids, ignore_eos, offsets

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request) -> Any:
        started = time.perf_counter()
        raw = await json_body(request)
        # parsing and tokenizing cost up to the body's size: in a worker thread, the event loop goes on streaming
        req, ids, ignore_eos, offsets = await run_in_threadpool(prepare, raw)
        seqs, events = server.start(req, ids, ignore_eos)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.name}
        prompt_tokens = sum(len(p) for p in ids)
        job = _Job(server, req, seqs, events, ids, offsets, started)
        if req.stream:
            return StreamingResponse(_stream(job, meta, prompt_tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_on_disconnect(request, seqs, server.engine))
        try:
            choices, completion_tokens, error = await _collect(job)
        finally:
            watcher.cancel()
            server.engine.cancel(seqs)
        if error:
            raise ApiError(f"generation failed ({public(error)}); the request can be retried", status=500,
                           kind="server_error")
        server.metrics.latency.observe(time.perf_counter() - started)
        return {**meta, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    def tokenize_body(raw: bytes) -> dict[str, Any]:
        prompt, special, strs = parse_tokenize(parse_body(raw))
        ids = server.tokenizer(prompt, add_special_tokens=special, verbose=False)["input_ids"]
        return {"count": len(ids), "max_model_len": server.context, "tokens": ids,
                "token_strs": server.tokenizer.convert_ids_to_tokens(ids) if strs else None}

    def detokenize_body(raw: bytes) -> dict[str, Any]:
        tokens = parse_detokenize(parse_body(raw), server.vocab)
        return {"prompt": server.tokenizer.decode(tokens)}

    @app.post("/tokenize", dependencies=[Depends(authorized)])
    async def tokenize(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(tokenize_body, await json_body(request))

    @app.post("/detokenize", dependencies=[Depends(authorized)])
    async def detokenize(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(detokenize_body, await json_body(request))

    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _on_disconnect(request: Any, seqs: list[Sequence], engine: Engine) -> None:
    """Free the request's slots as soon as its client goes away (the body was read: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            engine.cancel(seqs)
            return


class _Job:
    """One completion request on its way: what the routes hand to _events."""

    def __init__(self, server: Server, req: CompletionRequest, seqs: list[Sequence], events: asyncio.Queue,
                 ids: list[list[int]], offsets: list[list[int]] | None, started: float):
        self.server, self.req, self.seqs, self.events, self.started = server, req, seqs, events, started
        self.ids, self.offsets = ids, offsets  # offsets: each prompt token's start, when echo scores the prompt


# One logprobs entry: (token id, its Scored or None for the first prompt token, where it starts in the text)
Entry = tuple[int, "Scored | None", int]


async def _events(job: _Job):
    """(choice index, text delta, finish reason or None, logprobs entries, whether the delta is a token) per echoed
    prompt, per token, then per choice its end; errors as reason 'error: ...'. The entries are [] unless the
    request asked for logprobs."""
    req, seqs, server = job.req, job.seqs, job.server
    streams = [TextStream(server.tokenizer, req.stop) for _ in seqs]
    prompt_of = [i // req.n for i in range(len(seqs))]
    echoed = [False] * len(seqs)
    start = [len(req.prompts[p]) if req.echo else 0 for p in prompt_of]  # where the completion starts in the text
    first = True
    live = len(seqs)
    while live:
        index, token, reason = await job.events.get()
        if first:
            server.metrics.ttft.observe(time.perf_counter() - job.started)
            first = False
        stream, seq = streams[index], seqs[index]
        if req.echo and not echoed[index]:
            echoed[index] = True
            entries: list[Entry] = []
            if job.offsets is not None:
                ids, scored = job.ids[prompt_of[index]], seq.prompt_scored or []
                entries = [(t, scored[i - 1] if i else None, o)
                           for i, (t, o) in enumerate(zip(ids, job.offsets[prompt_of[index]], strict=True))]
            yield index, req.prompts[prompt_of[index]], None, entries, False
        if token is not None:
            if stream.stopped:  # tokens the engine made before it saw the cancel: not part of the answer
                continue
            offset = start[index] + len(stream.text)
            # the engine stored the k-th emitted token's Scored before it emitted the token
            entries = [(token, seq.scored[len(stream.ids)], offset)] if req.logprobs is not None else []
            delta = stream.add(token)
            if stream.stopped:  # a stop string: this choice is done, its slot freed at the next step
                seq.cancel()
            server.metrics.generation_tokens.inc()
            yield index, delta, None, entries, True
            continue
        live -= 1
        tail = stream.finish()
        yield index, tail, "stop" if stream.stopped else reason, [], False


def _logprobs(server: Server, entries: list[Entry]) -> dict[str, Any]:
    """The completions API's logprobs object: each token, its log-probability, the most likely tokens at its
    place (the chosen one always among them, as OpenAI lists it) and where it starts in the choice's text."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, scored, offset in entries:
        out["tokens"].append(server.token_text(token))
        out["text_offset"].append(offset)
        if scored is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        logprob, top = scored
        out["token_logprobs"].append(logprob)
        alternatives: dict[str, float] = {}
        for t, lp in top:
            alternatives.setdefault(server.token_text(t), lp)
        alternatives.setdefault(server.token_text(token), logprob)
        out["top_logprobs"].append(alternatives)
    return out


async def _collect(job: _Job) -> tuple[list[dict[str, Any]], int, str | None]:
    seqs = job.seqs
    texts = [""] * len(seqs)
    entries: list[list[Entry]] = [[] for _ in seqs]
    reasons: list[str | None] = [None] * len(seqs)
    tokens = 0
    error = None
    async for index, delta, reason, scored, is_token in _events(job):
        texts[index] += delta
        entries[index] += scored
        tokens += is_token
        if reason is not None:
            reasons[index] = reason
            if reason.startswith("error"):
                error = reason
    wanted = job.req.logprobs is not None
    choices = [{"text": t, "index": i, "logprobs": _logprobs(job.server, e) if wanted else None, "finish_reason": r}
               for i, (t, e, r) in enumerate(zip(texts, entries, reasons, strict=True))]
    return choices, tokens, error


async def _stream(job: _Job, meta: dict[str, Any], prompt_tokens: int):
    """Server-sent events: the echoed prompt, one chunk per token, one per finished choice, usage if asked, then
    [DONE]. A client that disconnects cancels this generator (Starlette), and with it the request's sequences."""
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**meta, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

    tokens = 0
    wanted = job.req.logprobs is not None
    try:
        async for index, delta, reason, scored, is_token in _events(job):
            if reason is not None and reason.startswith("error"):
                body = error_body(f"generation failed ({public(reason)}); the request can be retried",
                                  "server_error")
                yield f"data: {json.dumps(body)}\n\n"
                continue
            tokens += is_token
            yield chunk([{"text": delta, "index": index, "logprobs": _logprobs(job.server, scored) if wanted else None,
                          "finish_reason": reason}])
        if job.req.include_usage:
            yield chunk([], usage=_usage(prompt_tokens, tokens))
        yield "data: [DONE]\n\n"
        job.server.metrics.latency.observe(time.perf_counter() - job.started)
    finally:
        job.server.engine.cancel(job.seqs)
