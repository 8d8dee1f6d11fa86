"""OpenAPI request bodies of the generation endpoints.

The handlers read the raw JSON (``protocol.py`` checks it field by field), so
FastAPI cannot infer their schemas; these are attached with ``openapi_extra``
and served in ``/openapi.json``. Each schema states only constraints that
``protocol.py`` enforces, so a body the schema rejects is one the router
answers with a 4xx: ``tests/e2e/test_fault_schema.py`` checks exactly that
with schemathesis in negative mode. Unknown fields are allowed (they are
ignored, as OpenAI and vLLM do); ``null`` means "absent" for every optional
field.

    chat_operation()                  -> openapi_extra of POST /v1/chat/completions
    completion_operation(vocab_size)  -> openapi_extra of POST /v1/completions
"""

from pdserve.router.protocol import (
    MAX_CHAT_TOP_LOGPROBS,
    MAX_COMPLETION_LOGPROBS,
    MAX_STOP,
    ROLES,
)


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the request plane's msgpack integers


def _int(lo: int = INT64_MIN, hi: int = INT64_MAX) -> dict:
    return _nullable({"type": "integer", "minimum": lo, "maximum": hi})


def _number(lo: float, hi: float, lo_open: bool = False) -> dict:
    s: dict = {"type": "number", "maximum": hi}
    s["exclusiveMinimum" if lo_open else "minimum"] = lo
    return _nullable(s)


_BOOL = _nullable({"type": "boolean"})
_NONEMPTY_STR = {"type": "string", "minLength": 1}


def _common() -> dict:
    """Fields both endpoints read (``protocol._sampling``, ``_stream_flags``, ``_slo``)."""
    ms = _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": INT64_MAX})
    return {
        "model": _nullable({"type": "string"}),
        "max_tokens": _int(1),
        "temperature": _number(0, 2),
        "top_p": _number(0, 1, lo_open=True),
        "top_k": _int(-1),
        "n": _int(1, 1),  # one choice per request
        "seed": _int(),
        "presence_penalty": _number(0, 0),  # only 0 is supported
        "frequency_penalty": _number(0, 0),
        "repetition_penalty": _number(1, 1),
        "stop": _nullable({"anyOf": [_NONEMPTY_STR, {
            "type": "array", "maxItems": MAX_STOP, "items": _NONEMPTY_STR}]}),
        "stop_token_ids": _nullable({"type": "array", "items": {
            "type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}}),
        "ignore_eos": _BOOL,
        "skip_special_tokens": _BOOL,
        "include_stop_str_in_output": _BOOL,
        "stream": _BOOL,
        "stream_options": _nullable({"type": "object",
                                     "properties": {"include_usage": _BOOL}}),
        "slo": _nullable({"type": "object", "additionalProperties": False,
                          "properties": {"ttft_ms": ms, "tpot_ms": ms}}),
    }


_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"type": "string", "enum": ["text"]},
                             "text": {"type": "string"}}}
_MESSAGE = {
    "type": "object", "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": list(ROLES)},
        "content": _nullable({"anyOf": [{"type": "string"},
                                        {"type": "array", "items": _TEXT_PART}]}),
    },
}


def chat_request_schema() -> dict:
    props = _common()
    props.update({
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "max_completion_tokens": _int(1),
        "logprobs": _BOOL,
        "top_logprobs": _int(0, MAX_CHAT_TOP_LOGPROBS),
    })
    return {"type": "object", "required": ["messages"], "properties": props}


def completion_request_schema(vocab_size: int) -> dict:
    ids = {"type": "array", "minItems": 1,
           "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}
    props = _common()
    props.update({
        "prompt": {"anyOf": [
            _NONEMPTY_STR, ids,
            {"type": "array", "minItems": 1, "maxItems": 1,  # a batch of one
             "items": {"anyOf": [_NONEMPTY_STR, ids]}}]},
        "echo": _nullable({"type": "boolean", "enum": [False]}),
        "best_of": _int(1, 1),
        "logprobs": _int(0, MAX_COMPLETION_LOGPROBS),
    })
    return {"type": "object", "required": ["prompt"], "properties": props}


def _error_responses() -> dict:
    error = {"content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": _nullable({"type": "string"}),
                           "code": _nullable({"type": "string"})}}}}}}}
    return {str(code): {"description": why, **error} for code, why in (
        (400, "invalid request"), (401, "missing or wrong API key"),
        (404, "unknown model"), (409, "X-Request-Id already in flight"),
        (429, "over the SLO admission limit (Retry-After)"), (500, "the request failed"),
        (503, "no healthy worker (Retry-After)"), (504, "the request timed out"))}


def _operation(schema: dict) -> dict:
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}},
            "responses": _error_responses()}


def chat_operation() -> dict:
    return _operation(chat_request_schema())


def completion_operation(vocab_size: int) -> dict:
    return _operation(completion_request_schema(vocab_size))
