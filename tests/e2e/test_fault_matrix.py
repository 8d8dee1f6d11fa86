"""The fault matrix on real processes: kills, stops, stalls and cancels under load.

One cluster (1 prefill + 2 decode workers, fault injection on) runs the rows in
order; after each row, once quiet, the invariants hold: every block of every live
worker is free (counted), no request outlived its deadline, no worker died that the
row did not kill, and every request that succeeded gave exactly the greedy tokens.
"""

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from tests.e2e.faults import (
    TIMEOUT_S,
    ask,
    assert_exact_or_error,
    check_invariants,
    fault_config,
    prompt,
    run_load,
    send_stall,
    start_cluster,
    stop_cluster,
    wait_until,
    workers,
)


@pytest.fixture(scope="module")
def cluster():
    s = start_cluster(fault_config([{"name": "prefill0", "role": "prefill"},
                                    {"name": "decode0", "role": "decode"},
                                    {"name": "decode1", "role": "decode"}]))
    yield s
    stop_cluster(s)


def test_row12_stalled_engine_loop_flips_readiness(cluster, expected):
    by = workers(cluster)
    for name in ("decode0", "decode1"):
        send_stall(by[name]["request_address"], 12.0)
    t0 = time.monotonic()
    while httpx.get(cluster.url + "/health").status_code != 503:
        assert time.monotonic() - t0 < 9.0, "readiness did not flip"
        time.sleep(0.1)
    detect = time.monotonic() - t0
    assert detect < 9.0
    st = workers(cluster)
    assert not st["decode0"]["healthy"] and st["decode0"]["last_report_age_s"] < 2.0  # RPC ok
    while httpx.get(cluster.url + "/health").status_code != 200:
        assert time.monotonic() - t0 < 30.0, "readiness did not come back"
        time.sleep(0.2)
    assert_exact_or_error(run_load(cluster, range(4)), expected)
    check_invariants(cluster, {"prefill0", "decode0", "decode1"})


def test_row10_cancels_and_duplicate_ids(cluster, expected):
    long_body = {"model": "smollm2-135m", "max_tokens": 400, "ignore_eos": True,
                 "stream": True, "messages": [{"role": "user", "content": "story " * 300}]}
    with httpx.Client(base_url=cluster.url, timeout=60) as c:
        # cancel during prefill/transfer: leave before the first token
        with c.stream("POST", "/v1/chat/completions", json=long_body):
            pass
        # cancel during decode: leave after a few tokens
        with c.stream("POST", "/v1/chat/completions", json=long_body) as r:
            n = 0
            for line in r.iter_lines():
                n += line.startswith("data: ")
                if n >= 3:
                    break
    async def dup():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as c:
            hdr = {"X-Request-Id": "client-dup-1"}
            first = asyncio.create_task(c.post("/v1/chat/completions", headers=hdr, json={
                "model": "smollm2-135m", "max_tokens": 30, "ignore_eos": True,
                "messages": prompt(1)}))
            await asyncio.sleep(0.5)
            second = await c.post("/v1/chat/completions", headers=hdr, json={
                "model": "smollm2-135m", "max_tokens": 4, "messages": prompt(2)})
            return await first, second

    first, second = asyncio.run(dup())
    assert first.status_code == 200
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "duplicate_request_id"
    check_invariants(cluster, {"prefill0", "decode0", "decode1"})


def test_row5_stopped_prefill_is_ejected_and_routed_around(cluster, expected):
    pid = workers(cluster)["prefill0"]["pid"]
    before = cluster.status()["routing"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        while workers(cluster)["prefill0"]["healthy"]:
            assert time.monotonic() - t0 < 8.0
            time.sleep(0.1)
        detect = time.monotonic() - t0
        results = run_load(cluster, range(8))
        assert assert_exact_or_error(results, expected) == 8
        after = cluster.status()["routing"]
        assert after["remote_prefill"] == before["remote_prefill"]  # none sent to it
        assert after["local_prefill"] >= before["local_prefill"] + 8
    finally:
        os.kill(pid, signal.SIGCONT)
    t0 = time.monotonic()
    while not workers(cluster)["prefill0"]["healthy"]:  # readmitted after the back-off
        assert time.monotonic() - t0 < 30.0
        time.sleep(0.2)
    print(json.dumps({"row5_detect_s": round(detect, 2)}))
    check_invariants(cluster, {"prefill0", "decode0", "decode1"})


def test_row3_decode_killed_mid_stream_ends_with_error_event(cluster, expected):
    body = {"model": "smollm2-135m", "max_tokens": 3000, "ignore_eos": True, "stream": True,
            "messages": prompt(3)}
    events = []
    with httpx.Client(base_url=cluster.url, timeout=60) as c, c.stream(
            "POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        killed = None
        t_kill = None
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line)
            if len(events) == 3 and killed is None:
                def busy_decodes() -> list[dict]:
                    return [w for w in workers(cluster).values()
                            if w["role"] == "decode" and w["running"] > 0]

                # the router learns ``running`` from the next load report (every 0.5 s)
                wait_until(busy_decodes, 5, "no decode worker reported the stream running")
                busy = busy_decodes()
                assert len(busy) == 1
                killed = busy[0]["name"]
                t_kill = time.monotonic()
                os.kill(busy[0]["pid"], signal.SIGKILL)
    assert '"error"' in events[-1] and events[-1] != "data: [DONE]"
    assert time.monotonic() - t_kill < 10.0
    survivor = "decode1" if killed == "decode0" else "decode0"
    results = run_load(cluster, range(4))
    assert assert_exact_or_error(results, expected) == 4
    check_invariants(cluster, {"prefill0", survivor})
    cluster.killed_decode = killed


def test_row2_prefill_killed_during_handoff_is_routed_around(cluster, expected):
    survivor = "decode1" if getattr(cluster, "killed_decode", "decode0") == "decode0" \
        else "decode0"
    pid = workers(cluster)["prefill0"]["pid"]

    async def go():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=TIMEOUT_S + 30) as c:
            tasks = [asyncio.create_task(ask(c, i)) for i in range(4)]
            await asyncio.sleep(0.3)  # hand-offs are under way
            os.kill(pid, signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    ok = assert_exact_or_error(results, expected)
    assert ok == 4  # every hand-off was rerouted to a local prefill and completed
    # and with the prefill pool gone, new requests prefill locally (row 1)
    assert assert_exact_or_error(run_load(cluster, range(4, 8)), expected) == 4
    check_invariants(cluster, {survivor})
