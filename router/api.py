"""The OpenAI-compatible HTTP front door (FastAPI), programmed against a ``Dispatcher``.

    POST /v1/chat/completions, POST /v1/completions   (streamed as SSE or not)
    GET  /v1/models, /health, /status, /metrics

One request's life here::

    auth -> parse + validate (protocol.py, 400/404) -> rid = uuid4 (internal id)
         -> relay(dispatcher.generate(rid, ...))   deadline = now + request_timeout_s
         -> SSE chunks or one JSON body (sse.py)

``relay`` guarantees ``dispatcher.abort(rid)`` on every exit that is not a
finished delta: client disconnect (the streaming generator is cancelled; a
non-streamed request watches ``http.disconnect``), time-out (504 / error
event), a delta with ``error`` (500 / error event) or any other exception.
A stream's headers go out with its first token, so a request refused or failed
before any token gets a real status (429 + Retry-After, 5xx, 504); a failure
after that ends the stream with ``data: {"error": ...}`` and no ``[DONE]``.
A client's ``X-Request-Id`` is echoed back, never used as the internal id.
"""

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from pdserve.engine.messages import TokenDelta
from pdserve.router.dispatcher import Dispatcher, DispatchError
from pdserve.router.metrics import CLIENT_CLOSED, RequestTracker, RouterMetrics
from pdserve.router.openapi import chat_operation, completion_operation
from pdserve.router.protocol import (
    ApiError,
    GenerationRequest,
    parse_chat,
    parse_completion,
    parse_json,
)
from pdserve.router.sse import SSE_DONE, ResponseBuilder, sse_event

logger = logging.getLogger(__name__)
T = TypeVar("T")
_ID_PREFIX = {"chat": "chatcmpl-", "completion": "cmpl-"}


def _error_response(err: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status_code,
                        headers={**(headers or {}), **err.headers})


def _check_auth(request: Request, api_keys: frozenset[str]) -> None:
    if not api_keys:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or key.strip() not in api_keys:
        raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", type="authentication_error")


async def _abort(dispatcher: Dispatcher, request_id: str) -> None:
    """Abort, even from a cancelled task (the abort itself is shielded)."""
    with anyio.CancelScope(shield=True):
        await dispatcher.abort(request_id)


def _dispatch_error(err: DispatchError) -> ApiError:
    headers = {} if err.retry_after_s is None else {
        "Retry-After": str(max(1, math.ceil(err.retry_after_s)))}
    kind = "rate_limit_error" if err.status_code == 429 else "server_error"
    return ApiError(err.status_code, err.message, type=kind, headers=headers,
                    code="server_overloaded" if err.status_code == 429 else "unavailable")


async def _next(deltas: AsyncIterator[TokenDelta], deadline: float | None) -> TokenDelta:
    """The next delta, or ``ApiError`` (504 past the deadline, 5xx on any failure)."""
    try:
        if deadline is None:
            return await anext(deltas)
        return await asyncio.wait_for(anext(deltas), max(0.0, deadline - time.time()))
    except StopAsyncIteration:
        raise ApiError(500, "the worker's stream ended before the request finished",
                       type="server_error", code="internal_error") from None
    except asyncio.TimeoutError:
        raise ApiError(504, "the request timed out", type="timeout_error",
                       code="request_timeout") from None
    except DispatchError as err:
        raise _dispatch_error(err) from None
    except ApiError:
        raise
    except Exception as err:
        logger.exception("dispatcher failed")
        raise ApiError(500, f"internal error: {err}", type="server_error",
                       code="internal_error") from None


async def relay(dispatcher: Dispatcher, request_id: str, req: GenerationRequest,
                deadline: float | None, tracker: RequestTracker) -> AsyncIterator[TokenDelta]:
    """Deltas of one request until the finished one. Raises ``ApiError`` (504 past the
    deadline, 5xx on a delta with ``error`` or a failing dispatcher); aborts the request
    on every exit before a finished delta."""
    finished = False
    tracker.begin()
    own_slo = {} if req.slo is None else {"slo": req.slo}  # only for requests that set one
    deltas = dispatcher.generate(request_id, req.prompt_token_ids, req.sampling, deadline,
                                 **own_slo)
    try:
        while not finished:
            delta = await _next(deltas, deadline)
            if delta.error:
                raise ApiError(500, f"the request failed: {delta.error}", type="server_error",
                               code="internal_error")
            tracker.on_tokens(len(delta.token_ids))
            finished = delta.finished
            yield delta
    finally:
        if not finished:
            await _abort(dispatcher, request_id)
        with anyio.CancelScope(shield=True):
            await deltas.aclose()


async def _stream(first: TokenDelta, deltas: AsyncIterator[TokenDelta], builder: ResponseBuilder,
                  tracker: RequestTracker) -> AsyncIterator[str]:
    """SSE text of one request whose ``first`` delta is already in; ends with [DONE] or
    an error event."""
    status = CLIENT_CLOSED  # unless we get to the end
    try:
        opening = builder.first_chunk()
        if opening is not None:
            yield sse_event(opening)
        try:
            delta: TokenDelta | None = first
            while delta is not None:
                chunk = builder.chunk(delta)
                if chunk is not None:
                    yield sse_event(chunk)
                delta = await anext(deltas, None)
        except ApiError as err:
            status = err.status_code
            yield sse_event(err.body())
            return
        if builder.include_usage:
            yield sse_event(builder.usage_chunk())
        yield SSE_DONE
        status = 200
    finally:
        tracker.finish(status, builder.num_prompt_tokens)
        with anyio.CancelScope(shield=True):
            await deltas.aclose()  # runs relay's abort now rather than at garbage collection


class _EventStream(StreamingResponse):
    """Closes its body iterator however the response ends (disconnect included), so the
    request is aborted at once rather than when the generator is garbage collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result; if the client leaves first, cancel it (a ``relay`` inside
    then aborts) and raise ``ApiError`` 499. For use before a response has started."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        raise ApiError(CLIENT_CLOSED, "the client closed the connection", code="client_closed")
    return work.result()


async def _collect(deltas: AsyncIterator[TokenDelta], builder: ResponseBuilder) -> dict:
    async for delta in deltas:
        builder.add(delta)
    return builder.response()


def create_app(dispatcher: Dispatcher, api_keys: list[str] | None = None,
               request_timeout_s: float | None = None) -> FastAPI:
    """The router's HTTP app over ``dispatcher``. ``api_keys``: when non-empty, every
    /v1/* call needs ``Authorization: Bearer <key>``. ``request_timeout_s``: a request
    still running that long after arrival is aborted (504 or an error event)."""
    app = FastAPI(title="pdserve router")
    keys = frozenset(api_keys or ())
    metrics = RouterMetrics()
    app.state.dispatcher = dispatcher
    app.state.metrics = metrics
    live_client_ids: set[str] = set()  # X-Request-Id values of requests in flight

    async def released(client_id: str | None, deltas: AsyncIterator[TokenDelta]):
        try:
            async for d in deltas:
                yield d
        finally:
            live_client_ids.discard(client_id)
            with anyio.CancelScope(shield=True):
                await deltas.aclose()

    async def generate(request: Request, kind: str) -> Response:
        echo = {"X-Request-Id": request.headers["x-request-id"]} \
            if "x-request-id" in request.headers else {}
        try:
            _check_auth(request, keys)
            body = parse_json(await request.body())
            parse = parse_chat if kind == "chat" else parse_completion
            req = parse(body, dispatcher.model_name, dispatcher.max_model_len,
                        dispatcher.tokenizer)
        except ApiError as err:
            metrics.count(kind, err.status_code)
            return _error_response(err, echo)
        client_id = request.headers.get("x-request-id")
        if client_id is not None:
            if client_id in live_client_ids:
                metrics.count(kind, 409)
                return _error_response(ApiError(
                    409, f"request id {client_id!r} is already in flight", param="X-Request-Id",
                    code="duplicate_request_id"), echo)
            live_client_ids.add(client_id)
        request_id = uuid.uuid4().hex
        deadline = None if request_timeout_s is None else time.time() + request_timeout_s
        tracker = metrics.start(kind)
        builder = ResponseBuilder(kind, _ID_PREFIX[kind] + request_id, dispatcher.model_name,
                                  int(time.time()), dispatcher.tokenizer,
                                  len(req.prompt_token_ids), req.include_usage)
        deltas = released(client_id, relay(dispatcher, request_id, req, deadline, tracker))
        num_prompt = len(req.prompt_token_ids)
        try:
            if req.stream:  # wait for the first token, so an early failure gets its status
                first = await _unless_disconnected(request, anext(deltas))
            else:
                body = await _unless_disconnected(request, _collect(deltas, builder))
        except ApiError as err:
            tracker.finish(err.status_code, num_prompt)
            return _error_response(err, echo)
        if req.stream:
            return _EventStream(_stream(first, deltas, builder, tracker),
                                media_type="text/event-stream",
                                headers={**echo, "Cache-Control": "no-cache"})
        tracker.finish(200, num_prompt)
        return JSONResponse(body, headers=echo)

    @app.post("/v1/chat/completions", openapi_extra=chat_operation())
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/completions",
              openapi_extra=completion_operation(len(dispatcher.tokenizer)))
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            _check_auth(request, keys)
        except ApiError as err:
            return _error_response(err)
        return JSONResponse({"object": "list", "data": [{
            "id": dispatcher.model_name, "object": "model", "created": 0, "owned_by": "pdserve",
            "max_model_len": dispatcher.max_model_len}]})

    @app.get("/health")
    async def health() -> Response:
        ok, reason = dispatcher.ready()
        if ok:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    @app.get("/status")
    async def status() -> Response:
        return JSONResponse(dispatcher.status())

    @app.get("/metrics")
    async def prometheus() -> Response:
        extra = dispatcher.metrics_text()
        text = metrics.exposition() + (extra if not extra or extra.endswith("\n") else extra + "\n")
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
