"""The HTTP side: FastAPI routes in the OpenAI completions format over the batching engine, and the playground page.

    POST /v1/completions   prompt (string or list), max_tokens, temperature, top_p, n, stop, seed, stream;
                           extensions: top_k, ignore_eos
    GET  /v1/models        the one model served
    GET  /v1/model_card    size, training tokens, eval loss, bits per byte, loss curve (for the playground)
    GET  /health           liveness and the engine's load; never needs the API key
    GET  /                 the playground (a static page; it asks for the key where one is set)
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request, imported inside
# create_app to keep `--help` light) at definition time.
import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

from gpt2_dutch.serve.engine import Engine, QueueFull, Sampling, Sequence, new_generator
from gpt2_dutch.serve.protocol import ApiError, CompletionRequest, error_body, parse_body, parse_completion


class TextStream:
    """Token ids -> text deltas for one choice: waits for complete UTF-8 characters, holds back text that may be
    the start of a stop string, and cuts the text at the first stop string. Streamed deltas and the whole text of
    a non-streamed answer come from this one path, so they always agree."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.prefix = self.read = 0  # decode ids[prefix:] and keep what ids[prefix:read] did not already give
        self.text = ""  # the text decoded so far
        self.sent = 0  # how much of it was released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # a character still incomplete: wait
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once no token follows (an incomplete character decodes as U+FFFD)."""
        if not self.stopped:
            before = self._decode(self.ids[self.prefix:self.read])
            self.text += self._decode(self.ids[self.prefix:])[len(before):]
            self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            delta, self.text, self.sent, self.stopped = self.text[self.sent:cut], self.text[:cut], cut, True
            return delta
        hold = 0 if final else max((k for s in self.stops for k in range(1, len(s))
                                    if self.text.endswith(s[:k])), default=0)
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

    # ------------------------------------------------------------------------------------------- requests

    def plan(self, req: CompletionRequest) -> list[list[int]]:
        """Each prompt's token ids; ApiError where a prompt and its max_tokens do not fit the context."""
        ids = self.tokenizer(req.prompts, verbose=False)["input_ids"]
        for i, p in enumerate(ids):
            label = "the prompt" if len(ids) == 1 else f"prompt {i}"
            if not p:
                raise ApiError(f"{label} has no tokens", "prompt")
            if self.context and len(p) + req.max_tokens > self.context:
                raise ApiError(f"this model's context is {self.context} tokens, but {label} has {len(p)} tokens and "
                               f"max_tokens is {req.max_tokens}; shorten the prompt or lower max_tokens",
                               "max_tokens" if len(p) < self.context else "prompt", code="context_length_exceeded")
        rows = len(ids) * req.n
        if rows > self.engine.max_batch:
            raise ApiError(f"{len(ids)} prompts x n={req.n} asks for {rows} sequences; this server decodes at most "
                           f"{self.engine.max_batch} at once (--batch-size)", "n")
        return ids

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
                seqs.append(Sequence(prompt, req.max_tokens, Sampling(req.temperature, req.top_k, req.top_p, seed),
                                     emit, generator=new_generator(seed) if req.temperature > 0 else None,
                                     ignore_eos=ignore_eos))
        try:
            self.engine.submit(seqs)
        except QueueFull:
            raise ApiError(f"the server is busy: {self.engine.max_queue} requests are already waiting (--max-queue); "
                           "retry shortly", status=503, kind="server_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        return seqs, events


def create_app(server: Server) -> Any:
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = FastAPI(title="gpt2-dutch", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

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

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "gpt2-dutch"}]}

    @app.get("/v1/model_card", dependencies=[Depends(authorized)])
    async def card() -> dict[str, Any]:
        return server.card

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request) -> Any:
        body = parse_body(await request.body())
        req = parse_completion(body)
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError("'ignore_eos' must be true or false", "ignore_eos")
        ids = server.plan(req)
        seqs, events = server.start(req, ids, ignore_eos)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.name}
        prompt_tokens = sum(len(p) for p in ids)
        if req.stream:
            return StreamingResponse(_stream(server, req, seqs, events, meta, prompt_tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_on_disconnect(request, seqs, server.engine))
        try:
            choices, completion_tokens, error = await _collect(server, req, seqs, events)
        finally:
            watcher.cancel()
            server.engine.cancel(seqs)
        if error:
            raise ApiError(f"generation failed ({error}); the request can be retried", status=500,
                           kind="server_error")
        return {**meta, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

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


async def _events(server: Server, req: CompletionRequest, seqs: list[Sequence], events: asyncio.Queue):
    """(choice index, text delta, finish reason or None) per token, then per choice its end; errors as reason
    'error: ...'."""
    streams = [TextStream(server.tokenizer, req.stop) for _ in seqs]
    live = len(seqs)
    while live:
        index, token, reason = await events.get()
        stream = streams[index]
        if token is not None:
            if stream.stopped:  # tokens the engine made before it saw the cancel: not part of the answer
                continue
            delta = stream.add(token)
            if stream.stopped:  # a stop string: this choice is done, its slot freed at the next step
                seqs[index].cancel()
            yield index, delta, None
            continue
        live -= 1
        tail = stream.finish()
        yield index, tail, "stop" if stream.stopped else reason


async def _collect(server: Server, req: CompletionRequest, seqs: list[Sequence], events: asyncio.Queue
                   ) -> tuple[list[dict[str, Any]], int, str | None]:
    texts = [""] * len(seqs)
    reasons: list[str | None] = [None] * len(seqs)
    tokens = 0
    error = None
    async for index, delta, reason in _events(server, req, seqs, events):
        texts[index] += delta
        if reason is None:
            tokens += 1
        else:
            reasons[index] = reason
            if reason.startswith("error"):
                error = reason
    choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": r} for i, (t, r) in
               enumerate(zip(texts, reasons, strict=True))]
    return choices, tokens, error


async def _stream(server: Server, req: CompletionRequest, seqs: list[Sequence], events: asyncio.Queue,
                  meta: dict[str, Any], prompt_tokens: int):
    """Server-sent events: one chunk per token, one per finished choice, usage if asked, then [DONE]. A client
    that disconnects cancels this generator (Starlette), and with it the request's sequences."""
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**meta, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

    tokens = 0
    try:
        async for index, delta, reason in _events(server, req, seqs, events):
            if reason is not None and reason.startswith("error"):
                body = error_body(f"generation failed ({reason}); the request can be retried", "server_error")
                yield f"data: {json.dumps(body)}\n\n"
                continue
            tokens += reason is None
            yield chunk([{"text": delta, "index": index, "logprobs": None, "finish_reason": reason}])
        if req.include_usage:
            yield chunk([], usage=_usage(prompt_tokens, tokens))
        yield "data: [DONE]\n\n"
    finally:
        server.engine.cancel(seqs)
