"""OpenAI response bodies from ``TokenDelta``s: SSE chunks and whole responses.

A ``ResponseBuilder`` follows one request. Streaming, per request::

    data: {chunk: choices[0].delta = {"role": "assistant", "content": ""}}   (chat only)
    data: {chunk: the delta's text (+ logprobs)}            one per delta with news
    data: {chunk: ... finish_reason}                         on the last delta
    data: {"choices": [], "usage": {...}}                    if stream_options.include_usage
    data: [DONE]

or, when the request fails after the stream started, ``data: {"error": {...}}``
and the stream ends there. Not streaming, ``add`` every delta and send
``response()``. Logprobs follow OpenAI: chat ``{"content": [{token, logprob,
bytes, top_logprobs}]}``; completions the legacy ``tokens / token_logprobs /
top_logprobs / text_offset`` columns.
"""

import json
import math

from pdserve.engine.messages import TokenDelta

SSE_DONE = "data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0  # JSON has no -inf


def sse_event(obj: dict) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


class TokenTexts:
    """Token id -> its text (decoded alone, special tokens kept), memoized per request."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


class ResponseBuilder:
    """Builds one request's chunks or whole response; ``add``/``chunk`` mutate its totals."""

    def __init__(self, kind: str, response_id: str, model: str, created: int, tokenizer,
                 num_prompt_tokens: int, include_usage: bool = False) -> None:
        self.kind = kind  # "chat" | "completion"
        self.response_id = response_id
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self._texts = TokenTexts(tokenizer)
        self._text_parts: list[str] = []
        self._logprobs: dict | None = None  # whole-response logprobs, built by ``add``
        self._text_offset = 0

    # ---- accumulation --------------------------------------------------------------
    def add(self, delta: TokenDelta) -> dict | None:
        """Fold ``delta`` into the totals; returns the delta's own logprobs object (or None)."""
        self._text_parts.append(delta.text)
        self.num_output_tokens = max(self.num_output_tokens + len(delta.token_ids),
                                     delta.num_output_tokens)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
        if delta.logprobs is None:
            return None
        part = self._format_logprobs(delta.logprobs)
        if self._logprobs is None:
            self._logprobs = {k: [] for k in part}
        for k, v in part.items():
            self._logprobs[k].extend(v)
        return part

    def _format_logprobs(self, entries: list[list]) -> dict:
        tok = self._texts
        if self.kind == "chat":
            return {"content": [
                {"token": tok(tid), "logprob": _finite(lp), "bytes": list(tok(tid).encode()),
                 "top_logprobs": [{"token": tok(t), "logprob": _finite(tlp),
                                   "bytes": list(tok(t).encode())} for t, tlp in top]}
                for tid, lp, top in entries]}
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp, top in entries:
            top_dict = {tok(t): _finite(tlp) for t, tlp in top}
            top_dict.setdefault(tok(tid), _finite(lp))  # OpenAI: the sampled one is always in
            out["tokens"].append(tok(tid))
            out["token_logprobs"].append(_finite(lp))
            out["top_logprobs"].append(top_dict)
            out["text_offset"].append(self._text_offset)
            self._text_offset += len(tok(tid))
        return out

    def usage(self) -> dict:
        return {"prompt_tokens": self.num_prompt_tokens,
                "completion_tokens": self.num_output_tokens,
                "total_tokens": self.num_prompt_tokens + self.num_output_tokens,
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}

    # ---- streaming -----------------------------------------------------------------
    def _chunk(self, choice: dict | None) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        chunk = {"id": self.response_id, "object": obj, "created": self.created,
                 "model": self.model, "choices": [] if choice is None else [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def first_chunk(self) -> dict | None:
        """The chat stream's opening chunk (role only); None for completions."""
        if self.kind != "chat":
            return None
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None})

    def chunk(self, delta: TokenDelta) -> dict | None:
        """The chunk carrying ``delta`` (None when it brings nothing to show). Calls ``add``."""
        logprobs = self.add(delta)
        if not delta.text and not delta.finished and logprobs is None:
            return None
        choice: dict = {"index": 0}
        if self.kind == "chat":
            choice["delta"] = {"content": delta.text} if delta.text else {}
        else:
            choice["text"] = delta.text
        choice["logprobs"] = logprobs
        choice["finish_reason"] = delta.finish_reason if delta.finished else None
        if delta.finished:
            choice["stop_reason"] = delta.stop_reason
        return self._chunk(choice)

    def usage_chunk(self) -> dict:
        chunk = self._chunk(None)
        chunk["usage"] = self.usage()
        return chunk

    # ---- whole response --------------------------------------------------------------
    def response(self) -> dict:
        """The non-streamed body, from everything ``add``-ed. Pure."""
        text = "".join(self._text_parts)
        choice: dict = {"index": 0}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs
        choice["finish_reason"] = self.finish_reason
        choice["stop_reason"] = self.stop_reason
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.response_id, "object": obj, "created": self.created,
                "model": self.model, "choices": [choice], "usage": self.usage()}
