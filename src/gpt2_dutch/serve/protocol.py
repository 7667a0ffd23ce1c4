"""The OpenAI completions request, checked field by field, and the error body the OpenAI API uses.

Every problem with a request is an `ApiError` (HTTP 400 unless said otherwise) whose body is
`{"error": {"message", "type", "param", "code"}}`, as the OpenAI API answers and its clients read. The body is
read bounded (`read_body`: at most MAX_BODY_BYTES, counted while it arrives, chunked or not) and parsed bounded
(`parse_body`: nesting, number literals, lone surrogates), so that no body, however malformed, is a 500. Fields the
API defines but this server does not implement (suffix, best_of) are refused when set to anything but their
neutral value, never silently ignored; fields the API does not define are ignored, as clients send extras
(`extra_body`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from gpt2_dutch.core.reading import nests_deeper_than

MAX_BODY_BYTES = 1 << 20  # a prompt longer than any context is refused long before; this bounds tokenizing
MAX_DEPTH = 32  # nesting of lists and objects in a body; a completions request uses 3
MAX_NUMBER_CHARS = 100  # characters of one number literal (a float's repr is at most 24)
MAX_INT = 2**63 - 1  # any integer field beyond this is out of range (and not echoed whole)
MAX_STOP = 4  # as in the OpenAI API
MAX_STOP_CHARS = 1000  # of one stop string: the text held back while a stop may be starting is at most this
MAX_SEED = 2**63 - 1  # torch.Generator takes 64 bits; JSON clients handle 63 safely
MAX_TEMPERATURE = 2.0  # the OpenAI API's range
MAX_LOGPROBS = 20  # alternatives per token: vLLM's default --max-logprobs (OpenAI's completions stop at 5)
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty: -2..2, as in the OpenAI API
MAX_BIAS = 100.0  # logit_bias values: -100..100


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class CompletionRequest:
    prompts: list[str]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    model: str | None
    echo: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None


def too_large(size: int | None = None) -> ApiError:
    got = f"is {size} bytes" if size is not None else f"goes on past {MAX_BODY_BYTES} bytes"
    # Connection: close, or the HTTP server would go on reading (and dropping) the rest of the body
    return ApiError(f"the request body {got}; at most {MAX_BODY_BYTES} bytes are accepted", status=413,
                    code="request_too_large", headers={"Connection": "close"})


async def read_body(request: Any) -> bytes:
    """The body of a Starlette request, read at most MAX_BODY_BYTES far: a declared Content-Length beyond that is
    refused before a byte is read, and a chunked body as soon as it passes the limit, not once it has all come."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > MAX_BODY_BYTES):
        raise too_large(int(declared) if len(declared) <= 18 else None)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


class _LongNumber(ValueError):
    pass


def _bounded(convert: Any) -> Any:
    def parse(literal: str) -> Any:
        if len(literal) > MAX_NUMBER_CHARS:
            raise _LongNumber(len(literal))
        return convert(literal)

    return parse


_parse_int, _parse_float = _bounded(int), _bounded(float)
# an escape that may leave half a surrogate pair unpaired (a raw surrogate in the bytes already failed to decode)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; ApiError (400) for anything else, however malformed: not UTF-8, not
    JSON, nested deeper than MAX_DEPTH, a number literal longer than MAX_NUMBER_CHARS, a lone surrogate."""
    if len(raw) > MAX_BODY_BYTES:
        raise too_large(len(raw))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError("the request body is not UTF-8 text") from None
    try:
        body = json.loads(text, parse_int=_parse_int, parse_float=_parse_float)
        too_deep = nests_deeper_than(body, MAX_DEPTH)
    except json.JSONDecodeError as e:
        raise ApiError(f"the request body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") \
            from None
    except _LongNumber as e:
        raise ApiError(f"the request body holds a number of {e.args[0]} characters; at most {MAX_NUMBER_CHARS} "
                       "are read") from None
    except RecursionError:  # the decoder recurses once per level: far deeper than MAX_DEPTH
        too_deep = True
    if too_deep:
        raise ApiError(f"the request body nests lists or objects deeper than {MAX_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(text):
        try:  # json.loads pairs the halves of a real pair: what stays unpaired cannot be encoded
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError("the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is no "
                           "character; send text as UTF-8 or escape a character outside the BMP as a pair") \
                from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, not {_kind(body)}")
    return body


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    """The checked request; ApiError naming the first bad field."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError("'prompt' is required: a string or a list of strings", "prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        raise ApiError("prompts given as token ids are not supported; send text", "prompt")
    else:
        raise ApiError(f"'prompt' must be a string or a non-empty list of strings, not {_kind(prompt)}", "prompt")
    if any(not p for p in prompts):
        raise ApiError("'prompt' must not be empty", "prompt")

    echo = body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise ApiError(f"'echo' must be true or false, not {_kind(echo)}", "echo")
    max_tokens = _integer(body, "max_tokens", 16)
    if max_tokens < 0 or (max_tokens == 0 and not echo):
        raise ApiError(f"'max_tokens' must be at least 1 (got {max_tokens}); 0 is allowed with echo: true, to score "
                       "the prompt only", "max_tokens")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _integer(body, "logprobs", 0)
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise ApiError(f"'logprobs' must be between 0 and {MAX_LOGPROBS} (got {logprobs}): how many of the most "
                           "likely tokens to list beside each chosen one", "logprobs")
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        penalties[name] = _number(body, name, 0.0)
        if not -MAX_PENALTY <= penalties[name] <= MAX_PENALTY:
            raise ApiError(f"'{name}' must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g} "
                           f"(got {penalties[name]:g})", name)
    logit_bias = _logit_bias(body.get("logit_bias"))
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise ApiError(f"'temperature' must be between 0 and {MAX_TEMPERATURE:g} (got {temperature:g}); 0 is greedy",
                       "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(f"'top_p' must be in (0, 1] (got {top_p:g})", "top_p")
    top_k = _integer(body, "top_k", 0)
    if top_k < 0:
        raise ApiError(f"'top_k' must be 0 (off) or more (got {top_k})", "top_k")
    n = _integer(body, "n", 1)
    if n < 1:
        raise ApiError(f"'n' must be at least 1 (got {n})", "n")
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(body, "seed", 0)
        if not 0 <= seed <= MAX_SEED:
            raise ApiError(f"'seed' must be between 0 and {MAX_SEED} (got {seed})", "seed")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise ApiError(f"'stop' must be a string or a list of strings, not {_kind(stop)}", "stop")
    if len(stops) > MAX_STOP or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(f"'stop' takes at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters "
                       f"each (got {len(stops)}, the longest of {max(map(len, stops), default=0)})", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(f"'stream' must be true or false, not {_kind(stream)}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(f"'model' must be a string, not {_kind(model)}", "model")
    _unsupported(body, n)
    return CompletionRequest(prompts, max_tokens, temperature, top_p, top_k, n, stops, seed, stream,
                             bool(options.get("include_usage", False)), model, echo, logprobs,
                             penalties["presence_penalty"], penalties["frequency_penalty"], logit_bias)


def _logit_bias(value: Any) -> dict[int, float] | None:
    """{"token id": bias} -> {id: bias}; whether each id is in the vocabulary is the server's check."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise ApiError(f"'logit_bias' must be an object of token ids and biases like {{\"50256\": -100}}; "
                       f"{_kind(value)} is not supported", "logit_bias")
    out = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 18):
            raise ApiError(f"'logit_bias' keys must be token ids written as decimal strings (got '{key[:40]}')",
                           "logit_bias")
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias) \
                or not -MAX_BIAS <= bias <= MAX_BIAS:
            raise ApiError(f"'logit_bias' values must be numbers from -{MAX_BIAS:g} to {MAX_BIAS:g} "
                           f"(token {key[:18]}: {_kind(bias)})", "logit_bias")
        out[int(key)] = float(bias)
    return out


def _unsupported(body: dict[str, Any], n: int) -> None:
    """OpenAI fields this server does not implement: accepted at their neutral value only."""
    suffix = body.get("suffix")
    if suffix not in (None, ""):
        raise ApiError("'suffix' is not supported by this server", "suffix")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise ApiError("'best_of' is not supported by this server (use n)", "best_of")


def parse_tokenize(body: dict[str, Any]) -> tuple[str, bool, bool]:
    """vLLM's /tokenize request: (prompt, add_special_tokens, return_token_strs)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(f"'prompt' must be a string, not {_kind(prompt)}", "prompt")
    flags = []
    for name, default in (("add_special_tokens", True), ("return_token_strs", False)):
        value = body.get(name, default)
        if not isinstance(value, bool):
            raise ApiError(f"'{name}' must be true or false, not {_kind(value)}", name)
        flags.append(value)
    return prompt, flags[0], flags[1]


def parse_detokenize(body: dict[str, Any], vocab: int) -> list[int]:
    """vLLM's /detokenize request: the token ids, each in the vocabulary."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ApiError(f"'tokens' must be a list of token ids, not {_kind(tokens)}", "tokens")
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(f"token id {str(bad)[:20]} is not in this model's vocabulary (0 to {vocab - 1})", "tokens")
    return tokens


def _integer(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return int(value)  # JSON writers that only have doubles send 16.0
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(f"'{name}' must be an integer, not {_kind(value)}", name)
    if abs(value) > MAX_INT:
        raise ApiError(f"'{name}' is out of range: an integer of {len(str(abs(value)))} digits", name)
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ApiError(f"'{name}' must be a number, not {_kind(value)}", name)
    if not math.isfinite(value):  # Python's JSON reader takes NaN and Infinity
        raise ApiError(f"'{name}' must be a finite number (got {value})", name)
    return float(value)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__) + \
        (f" ({json.dumps(value)[:40]})" if not isinstance(value, (dict, list)) else "")
