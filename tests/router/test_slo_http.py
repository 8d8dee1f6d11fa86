"""SLO admission over HTTP: the real app, ZmqDispatcher, Placer and Registry, with one
ZeroMQ socket standing in for the decode worker (it answers each request it is sent).

On an idle cluster with the CPU profile a 64-token prompt's best TTFT is ~0.13 s and
its TPOT ~0.18 s, so a 1 ms TTFT or a 100 ms TPOT target cannot be met."""

import asyncio
import time

import httpx
import pytest
import zmq
import zmq.asyncio

from pdserve.engine import messages as m
from pdserve.engine.block_hash import HASH_ALGORITHM
from pdserve.engine.control_plane import pb
from pdserve.router.admission import SloConfig
from pdserve.router.api import create_app
from pdserve.router.placement import Placer
from pdserve.router.registry import Expectation, Registry
from pdserve.router.zmq_dispatcher import ZmqDispatcher

TOKEN = "slo-token"
PROMPT = list(range(1000, 1064))  # 64 token ids, no template


@pytest.fixture(scope="module")
def tok():
    from pdserve.engine.tokenizer import load_tokenizer
    from pdserve.engine.weights import resolve_model_dir

    return load_tokenizer(resolve_model_dir("smollm2-135m"))


def serve_and_post(tok, slo: SloConfig, bodies: list[dict], free_blocks_later: int | None = None):
    """POST ``bodies`` one after another to a router with config SLO ``slo``; returns
    [(status, json, Retry-After, seconds)], the Placer's stats, and the GenerateRequests
    the decode socket got."""
    async def go():
        ctx = zmq.asyncio.Context()
        inbox = ctx.socket(zmq.PULL)
        port = inbox.bind_to_random_port("tcp://127.0.0.1")
        registry = Registry(Expectation("smollm2-135m", 16, 0, HASH_ALGORITHM), 60.0, 60.0)
        for wid, role, addr in (("p0", "prefill", "tcp://127.0.0.1:1"),
                                ("d0", "decode", f"tcp://127.0.0.1:{port}")):
            assert registry.register(pb.WorkerInfo(
                worker_id=wid, role=role, request_address=addr, model="smollm2-135m",
                block_size=16, hash_seed=0, hash_algorithm=HASH_ALGORITHM,
                total_blocks=1000)) is None
            registry.report(wid, {"loop_age_s": 0.0,
                                  "free_blocks": 0 if free_blocks_later else 1000})
        placer = Placer(registry, TOKEN, "disaggregated", slo=slo)
        d = ZmqDispatcher("smollm2-135m", tok, 8192, registry, TOKEN, "disaggregated",
                          placer=placer)
        await d.start()
        out = ctx.socket(zmq.PUSH)
        out.connect(d.token_address)
        got: list[m.GenerateRequest] = []

        async def decode_worker():
            while True:
                msg = m.decode(await inbox.recv())
                got.append(msg)
                await out.send(m.encode(m.TokenBatch(TOKEN, "d0", [m.TokenDelta(
                    request_id=msg.request_id, token_ids=[42], text="*", finished=True,
                    finish_reason="length", num_prompt_tokens=64, num_output_tokens=1)])))

        worker = asyncio.create_task(decode_worker())
        if free_blocks_later:
            asyncio.get_running_loop().call_later(
                0.3, registry.report, "d0", {"loop_age_s": 0.0, "free_blocks": 1000})
        replies = []
        transport = httpx.ASGITransport(app=create_app(d))
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
            for body in bodies:
                t0 = time.monotonic()
                r = await c.post("/v1/completions", json={
                    "model": "smollm2-135m", "prompt": PROMPT, "max_tokens": 1, **body})
                replies.append((r.status_code, r.json(), r.headers.get("retry-after"),
                                time.monotonic() - t0))
            status = (await c.get("/status")).json()
        worker.cancel()
        await d.close()
        ctx.destroy(linger=0)
        return replies, placer.stats, got, status  # stats: a Counter

    return asyncio.run(go())


def test_unmeetable_targets_get_429_with_retry_after_and_loose_ones_are_served(tok):
    slo = SloConfig(ttft_s=0.001, max_waiting=0)
    replies, stats, got, status = serve_and_post(tok, slo, [
        {}, {"slo": {"ttft_ms": 60000, "tpot_ms": 100}}, {"slo": {"ttft_ms": 60000}}])
    (s1, j1, ra1, _), (s2, j2, ra2, _), (s3, j3, ra3, _) = replies
    # the config's 1 ms TTFT: refused at once (no room to wait), Retry-After min_retry_s
    assert (s1, ra1, j1["error"]["type"], j1["error"]["code"]) == (
        429, "1", "rate_limit_error", "server_overloaded")
    assert j1["error"]["message"].startswith("no placement meets the SLO (best: ")
    # the request's own targets replace the config's: TPOT 100 ms is still out of reach
    assert (s2, ra2) == (429, "1")
    # a loose TTFT of its own (and the config's TPOT: none): served
    assert (s3, ra3, j3["choices"][0]["text"], j3["usage"]["completion_tokens"]) == (
        200, None, "*", 1)
    assert stats["rejected"] == 2 and stats["waited"] == 0
    assert [g.prompt_token_ids for g in got] == [PROMPT]
    assert status["slo"] == {"ttft_ms": 1.0, "tpot_ms": None, "max_queue_s": 5.0,
                             "max_waiting": 0}


def test_a_request_queues_within_the_bound_then_429(tok):
    slo = SloConfig(ttft_s=0.001, max_waiting=4, max_wait_s=0.4, poll_s=0.05)
    [(status, body, retry, seconds)], stats, got, _ = serve_and_post(tok, slo, [{}])
    assert (status, retry, stats["waited"], stats["rejected"], got) == (429, "1", 1, 1, [])
    assert 0.35 <= seconds < 2.0


def test_a_queued_request_is_admitted_once_a_placement_meets_the_slo(tok):
    # the decode worker reports no free block (no candidate is feasible) for 0.3 s
    slo = SloConfig(ttft_s=60.0, max_waiting=4, max_wait_s=5.0, poll_s=0.05)
    [(status, body, retry, seconds)], stats, got, _ = serve_and_post(
        tok, slo, [{}], free_blocks_later=1000)
    assert (status, body["choices"][0]["text"], stats["waited"], stats["rejected"]) == (
        200, "*", 1, 0)
    assert len(got) == 1 and 0.25 <= seconds < 3.0
