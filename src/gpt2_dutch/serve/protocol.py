"""The OpenAI completions request, checked field by field, and the error body the OpenAI API uses.

Every problem with a request is an `ApiError` (HTTP 400 unless said otherwise) whose body is
`{"error": {"message", "type", "param", "code"}}`, as the OpenAI API answers and its clients read. Fields the
API defines but this server does not implement (echo, logprobs, penalties, ...) are refused when set to
anything but their neutral value, never silently ignored; fields the API does not define are ignored, as
clients send extras (`extra_body`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_BODY_BYTES = 1 << 20  # a prompt longer than any context is refused long before; this bounds tokenizing
MAX_STOP = 4  # as in the OpenAI API
MAX_SEED = 2**63 - 1  # torch.Generator takes 64 bits; JSON clients handle 63 safely
MAX_TEMPERATURE = 2.0  # the OpenAI API's range


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


def parse_body(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(f"the request body is {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ApiError(f"the request body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") \
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

    max_tokens = _integer(body, "max_tokens", 16)
    if max_tokens < 1:
        raise ApiError(f"'max_tokens' must be at least 1 (got {max_tokens})", "max_tokens")
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
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ApiError(f"'stop' takes at most {MAX_STOP} non-empty strings", "stop")
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
                             bool(options.get("include_usage", False)), model)


def _unsupported(body: dict[str, Any], n: int) -> None:
    """OpenAI fields this server does not implement: accepted at their neutral value only."""
    def neutral(name: str, value: Any) -> bool:
        if value is None:
            return True
        if name == "echo":
            return value is False
        if name in ("frequency_penalty", "presence_penalty"):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
        return value in ("", {}) if name in ("suffix", "logit_bias") else False

    for name in ("echo", "logprobs", "suffix", "frequency_penalty", "presence_penalty", "logit_bias"):
        if name in body and not neutral(name, body[name]):
            raise ApiError(f"'{name}' is not supported by this server", name)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise ApiError("'best_of' is not supported by this server (use n)", "best_of")


def _integer(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return int(value)  # JSON writers that only have doubles send 16.0
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(f"'{name}' must be an integer, not {_kind(value)}", name)
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
