"""OpenAI request bodies -> validated ``GenerationRequest``s; OpenAI error JSON.

``parse_chat`` and ``parse_completion`` check a decoded JSON body field by
field (a wrong type names the field), apply the chat template or tokenize
the prompt, check the context length, and build the ``SamplingSpec``. Every
problem raises ``ApiError`` (400, or 404 ``model_not_found``) whose ``body()``
is OpenAI's error object. Unknown fields are ignored, as OpenAI and vLLM do.

    max_tokens:  given -> prompt + max_tokens must fit in max_model_len
                 absent -> max_model_len - prompt tokens (the room left, as vLLM does)
    slo:         pdserve's extension, {"ttft_ms": 500, "tpot_ms": 50} (either may be
                 left out or null): this request's own SLO targets, positive
                 milliseconds, in place of the config's (router.slo)
"""

import json
import math
from dataclasses import dataclass
from typing import Any

from pdserve.engine.messages import SamplingSpec
from pdserve.engine.tokenizer import apply_chat_template
from pdserve.router.admission import SloTargets

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOP = 4
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
_ZERO_ONLY = ("presence_penalty", "frequency_penalty")


class ApiError(Exception):
    """An error the client sees as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status_code: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, ready for ``Dispatcher.generate``."""

    kind: str  # "chat" | "completion"
    prompt_token_ids: list[int]
    sampling: SamplingSpec  # logprobs is None unless the client asked for logprobs
    stream: bool = False
    include_usage: bool = False
    slo: SloTargets | None = None  # the request's own targets (None: the config's)


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except ValueError as e:  # bad UTF-8, bad JSON, or a number too long to convert
        raise bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_type_name(body)}")
    return body


# ---- typed field access ---------------------------------------------------------------

def _type_name(value: Any) -> str:
    if type(value) is int and not _is_int64(value):
        return "an integer outside the 64-bit range"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(value),
                                                                        type(value).__name__)


def _is_int64(v: int) -> bool:
    return -(2**63) <= v < 2**63


# Integers must fit the request plane's 64-bit msgpack ints (and numbers a float).
_KINDS = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool) and _is_int64(v),
    "number": lambda v: isinstance(v, float) or _KINDS["integer"](v),
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
}


def _field(body: dict, name: str, kind: str, default: Any = None) -> Any:
    """``body[name]`` checked to be of ``kind``; ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if not _KINDS[kind](value):
        raise bad(f"'{name}' must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, "
                  f"got {_type_name(value)}", name)
    return value


def _in_range(body: dict, name: str, kind: str, lo: float | None, hi: float | None,
              default: Any = None, lo_open: bool = False) -> Any:
    value = _field(body, name, kind)
    if value is None:
        return default
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    if too_low or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        raise bad(f"'{name}' must be in {left}{lo}, {hi}], got {value}" if hi is not None
                  else f"'{name}' must be >= {lo}, got {value}", name)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or an array of strings", "stop")
    if len(stop) > MAX_STOP:
        raise bad(f"'stop' holds at most {MAX_STOP} strings, got {len(stop)}", "stop")
    if any(not s for s in stop):
        raise bad("'stop' strings must be non-empty", "stop")
    return stop


def _int_list(body: dict, name: str) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_KINDS["integer"](t) for t in value):
        raise bad(f"'{name}' must be an array of integers", name)
    return value


# ---- the common part ------------------------------------------------------------------

def check_model(body: dict, model_name: str) -> None:
    model = _field(body, "model", "string")
    if model is not None and model != model_name:
        raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")


def _sampling(body: dict, num_prompt_tokens: int, max_model_len: int, max_tokens: int | None,
              logprobs: int | None) -> SamplingSpec:
    n = _field(body, "n", "integer", 1)
    if n != 1:
        raise bad(f"'n' must be 1 (one choice per request is supported), got {n}", "n")
    for name in _ZERO_ONLY:
        if _field(body, name, "number", 0) != 0:
            raise bad(f"'{name}' is not supported (only 0)", name)
    if _field(body, "repetition_penalty", "number", 1) != 1:
        raise bad("'repetition_penalty' is not supported (only 1)", "repetition_penalty")
    if num_prompt_tokens >= max_model_len:
        raise bad(f"This model's maximum context length is {max_model_len} tokens, but the "
                  f"prompt has {num_prompt_tokens} tokens (it must leave room for at least one "
                  "new token).", "messages" if "messages" in body else "prompt",
                  "context_length_exceeded")
    room = max_model_len - num_prompt_tokens
    if max_tokens is not None and max_tokens > room:
        raise bad(f"This model's maximum context length is {max_model_len} tokens, but "
                  f"{num_prompt_tokens + max_tokens} were requested ({num_prompt_tokens} in the "
                  f"prompt, {max_tokens} for the completion).", "max_tokens",
                  "context_length_exceeded")
    top_k = _field(body, "top_k", "integer")
    if top_k is not None and top_k < -1:
        raise bad(f"'top_k' must be -1 or 0 (disabled) or >= 1, got {top_k}", "top_k")
    spec = SamplingSpec(
        temperature=float(_in_range(body, "temperature", "number", 0, 2, 1.0)),
        top_p=float(_in_range(body, "top_p", "number", 0, 1, 1.0, lo_open=True)),
        top_k=None if top_k in (None, -1, 0) else top_k,
        seed=_field(body, "seed", "integer"),
        max_tokens=room if max_tokens is None else max_tokens,
        stop=_stop(body),
        stop_token_ids=_int_list(body, "stop_token_ids"),
        ignore_eos=_field(body, "ignore_eos", "boolean", False),
        logprobs=logprobs,
        skip_special_tokens=_field(body, "skip_special_tokens", "boolean", True),
        include_stop_str_in_output=_field(body, "include_stop_str_in_output", "boolean", False))
    try:
        spec.to_params()
    except ValueError as e:
        raise bad(str(e)) from None
    return spec


def _slo(body: dict) -> SloTargets | None:
    """The ``slo`` extension field: positive, finite milliseconds per target."""
    slo = _field(body, "slo", "object")
    if slo is None:
        return None
    for key in slo:
        if key not in ("ttft_ms", "tpot_ms"):
            raise bad(f"'slo' has an unknown key '{key}' (allowed: ttft_ms, tpot_ms)",
                      f"slo.{key}")
    seconds = {}
    for key in ("ttft_ms", "tpot_ms"):
        v = slo.get(key)
        if v is not None and (not _KINDS["number"](v) or not math.isfinite(v) or v <= 0):
            raise bad(f"'slo.{key}' must be a positive number of milliseconds, got "
                      f"{json.dumps(v)}", f"slo.{key}")
        seconds[key] = None if v is None else v / 1e3
    return SloTargets(seconds["ttft_ms"], seconds["tpot_ms"])


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _field(body, "stream", "boolean", False)
    options = _field(body, "stream_options", "object")
    if options is not None and not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = _field(options or {}, "include_usage", "boolean", False)
    return stream, include_usage


# ---- the two endpoints ----------------------------------------------------------------

def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required", "messages")
    if not isinstance(messages, list):
        raise bad(f"'messages' must be an array, got {_type_name(messages)}", "messages")
    if not messages:
        raise bad("'messages' must not be empty", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object, got {_type_name(m)}", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                      f"messages[{i}].role")
    return messages


def parse_chat(body: dict, model_name: str, max_model_len: int,
               tokenizer) -> GenerationRequest:
    """Validate a /v1/chat/completions body and apply the chat template. Pure."""
    check_model(body, model_name)
    messages = _messages(body)
    try:
        prompt_ids = apply_chat_template(tokenizer, messages)
    except ValueError as e:
        raise bad(str(e), "messages") from None
    except Exception as e:  # the template itself refused the conversation (jinja)
        raise bad(f"the chat template rejected the messages: {e}", "messages") from None
    max_tokens = _in_range(body, "max_completion_tokens", "integer", 1, None)
    if max_tokens is None:
        max_tokens = _in_range(body, "max_tokens", "integer", 1, None)
    want = _field(body, "logprobs", "boolean", False)
    top = _in_range(body, "top_logprobs", "integer", 0, MAX_CHAT_TOP_LOGPROBS)
    if top is not None and not want:
        raise bad("'logprobs' must be true when 'top_logprobs' is set", "top_logprobs")
    stream, include_usage = _stream_flags(body)
    spec = _sampling(body, len(prompt_ids), max_model_len, max_tokens,
                     (top or 0) if want else None)
    return GenerationRequest("chat", prompt_ids, spec, stream, include_usage, _slo(body))


def _prompt_ids(body: dict, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(_KINDS["integer"](t) for t in prompt):
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise bad(f"'prompt' token ids must be in [0, {vocab})", "prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise bad(f"batched prompts are not supported ({len(prompt)} prompts); send one "
                  "request per prompt", "prompt")
    else:
        raise bad("'prompt' must be a string or a non-empty array of token ids", "prompt")
    if not ids:
        raise bad("'prompt' is empty", "prompt")
    return ids


def parse_completion(body: dict, model_name: str, max_model_len: int,
                     tokenizer) -> GenerationRequest:
    """Validate a /v1/completions body and tokenize its prompt. Pure."""
    check_model(body, model_name)
    if _field(body, "echo", "boolean", False):
        raise bad("'echo' is not supported", "echo")
    if _field(body, "best_of", "integer", 1) != 1:
        raise bad("'best_of' is not supported (only 1)", "best_of")
    prompt_ids = _prompt_ids(body, tokenizer)
    max_tokens = _in_range(body, "max_tokens", "integer", 1, None)
    logprobs = _in_range(body, "logprobs", "integer", 0, MAX_COMPLETION_LOGPROBS)
    stream, include_usage = _stream_flags(body)
    spec = _sampling(body, len(prompt_ids), max_model_len, max_tokens, logprobs)
    return GenerationRequest("completion", prompt_ids, spec, stream, include_usage,
                             _slo(body))
