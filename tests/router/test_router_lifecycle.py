"""Early ends: client disconnects, time-outs and worker errors abort the request and
free its KV blocks; /health, /status and /metrics."""

import asyncio
import json
import time

import httpx
import pytest

from pdserve.engine.messages import TokenDelta
from pdserve.router.dispatcher import DispatchError

USER = [{"role": "user", "content": "Tell me a long story about a dragon."}]
LONG = {"model": "smollm2-135m", "messages": USER, "max_tokens": 500, "temperature": 0,
        "ignore_eos": True}


def _events(lines) -> list:
    """Decoded ``data:`` payloads of an SSE line stream ("[DONE]" kept as a string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_stream_disconnect_aborts(idle, server):
    before = len(idle.aborted_ids)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**LONG, "stream": True},
                      timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        got = []
        for line in r.iter_lines():
            got.extend(_events([line]))
            if len(got) == 3:  # the role chunk and two tokens
                break
    rid = got[0]["id"].removeprefix("chatcmpl-")
    assert idle.wait_idle(), "blocks were not freed after the client left"
    assert idle.aborted_ids[before:] == [rid]
    assert not idle.engine.has_unfinished()


def test_non_stream_disconnect_aborts(idle, server):
    before = len(idle.aborted_ids)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=LONG, timeout=1.0)
    assert idle.wait_idle()
    assert len(idle.aborted_ids) == before + 1
    assert idle.engine.pool.num_free_blocks == idle.engine.pool.num_blocks


def test_timeout_non_stream_504(idle, make_server):
    s = make_server(request_timeout_s=1.0)
    before = len(idle.aborted_ids)
    r = httpx.post(s.url + "/v1/chat/completions", json=LONG, timeout=30)
    assert r.status_code == 504
    assert r.json() == {"error": {"message": "the request timed out", "type": "timeout_error",
                                  "param": None, "code": "request_timeout"}}
    assert idle.wait_idle()
    assert len(idle.aborted_ids) == before + 1


def test_timeout_stream_error_event(idle, make_server):
    s = make_server(request_timeout_s=1.0)
    before = len(idle.aborted_ids)
    with httpx.stream("POST", s.url + "/v1/chat/completions", json={**LONG, "stream": True},
                      timeout=30) as r:
        events = _events(r.iter_lines())
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1] == {"error": {"message": "the request timed out", "type": "timeout_error",
                                    "param": None, "code": "request_timeout"}}
    assert "[DONE]" not in events
    assert idle.wait_idle()
    assert idle.aborted_ids[before:] == [events[0]["id"].removeprefix("chatcmpl-")]


class FailingDispatcher:
    """Relays the engine's first delta, then reports a dead worker."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.model_name, self.max_model_len = inner.model_name, inner.max_model_len
        self.tokenizer = inner.tokenizer

    async def generate(self, request_id, prompt_token_ids, sampling, deadline):
        async for delta in self.inner.generate(request_id, prompt_token_ids, sampling, deadline):
            yield delta
            break
        yield TokenDelta(request_id=request_id, token_ids=[], text="",
                         error="decode worker d0 died")

    async def abort(self, request_id):
        await self.inner.abort(request_id)

    def ready(self):
        return False, "no decode worker registered"

    def status(self):
        return {"workers": []}

    def metrics_text(self):
        return ""


@pytest.mark.parametrize("stream", [False, True])
def test_worker_error_ends_with_error(idle, make_server, stream):
    s = make_server(FailingDispatcher(idle))
    before = len(idle.aborted_ids)
    want = {"error": {"message": "the request failed: decode worker d0 died",
                      "type": "server_error", "param": None, "code": "internal_error"}}
    if stream:
        with httpx.stream("POST", s.url + "/v1/chat/completions",
                          json={**LONG, "stream": True}, timeout=30) as r:
            events = _events(r.iter_lines())
        assert events[-1] == want and "[DONE]" not in events
    else:
        r = httpx.post(s.url + "/v1/chat/completions", json=LONG, timeout=30)
        assert (r.status_code, r.json()) == (500, want)
    assert idle.wait_idle()
    assert len(idle.aborted_ids) == before + 1


def test_health_and_status(server, make_server, dispatcher):
    r = httpx.get(server.url + "/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    r = httpx.get(server.url + "/status")
    assert r.json() == {"workers": [{"id": "inproc-0", "role": "colocated",
                                     "num_free_blocks": 512}]}
    down = make_server(FailingDispatcher(dispatcher))
    r = httpx.get(down.url + "/health")
    assert (r.status_code, r.json()) == (503, {"status": "unavailable",
                                               "reason": "no decode worker registered"})


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics(idle, make_server, chat_ids):
    s = make_server()
    body = {"model": "smollm2-135m", "messages": USER, "max_tokens": 3, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert _events(r.iter_lines())[-1] == "[DONE]"
    assert httpx.post(s.url + "/v1/chat/completions", json={**body, "n": 2}).status_code == 400
    r = httpx.get(s.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = r.text
    p = "pdserve_router_"
    assert _sample(m, p + 'requests_total{endpoint="chat",status="200"}') == 1
    assert _sample(m, p + 'requests_total{endpoint="chat",status="400"}') == 1
    num_prompt = len(chat_ids(USER[0]["content"]))
    assert _sample(m, p + 'prompt_tokens_total{endpoint="chat"}') == num_prompt
    assert _sample(m, p + 'generation_tokens_total{endpoint="chat"}') == 3
    assert _sample(m, p + 'time_to_first_token_seconds_count{endpoint="chat"}') == 1
    assert _sample(m, p + 'inter_token_latency_seconds_count{endpoint="chat"}') == 2
    assert _sample(m, p + 'request_duration_seconds_count{endpoint="chat"}') == 1
    assert _sample(m, p + "running_requests") == 0
    assert _sample(m, "pdserve_test_free_blocks") == 512  # the dispatcher's own lines


class OverloadedDispatcher(FailingDispatcher):
    """Refuses every request at admission."""

    async def generate(self, request_id, prompt_token_ids, sampling, deadline):
        raise DispatchError("all decode workers are full", 429, retry_after_s=2.5)
        yield  # an async generator, like a real dispatcher's


@pytest.mark.parametrize("stream", [False, True])
def test_admission_refusal_is_429_with_retry_after(idle, make_server, stream):
    s = make_server(OverloadedDispatcher(idle))
    r = httpx.post(s.url + "/v1/chat/completions", json={**LONG, "stream": stream}, timeout=30)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert r.json() == {"error": {"message": "all decode workers are full",
                                  "type": "rate_limit_error", "param": None,
                                  "code": "server_overloaded"}}


class StuckDispatcher(FailingDispatcher):
    """Accepts requests and never produces a token."""

    async def generate(self, request_id, prompt_token_ids, sampling, deadline):
        await asyncio.Event().wait()
        yield


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_before_first_token_aborts(idle, make_server, stream):
    s = make_server(StuckDispatcher(idle))
    before = len(idle.aborted_ids)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.url + "/v1/chat/completions", json={**LONG, "stream": stream}, timeout=0.5)
    end = time.monotonic() + 5
    while len(idle.aborted_ids) == before and time.monotonic() < end:
        time.sleep(0.01)
    assert len(idle.aborted_ids) == before + 1
    r = httpx.get(s.url + "/metrics")
    assert 'pdserve_router_requests_total{endpoint="chat",status="499"} 1.0' in r.text
    assert "pdserve_router_running_requests 0.0" in r.text
