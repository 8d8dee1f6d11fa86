"""What the fault-matrix rows share (``test_fault_*.py``): a cluster started from a config
mapping, the rows' prompts, load, log look-ups, and the four invariants.

    cluster = start_cluster(fault_config(workers=...))    # real ``pdserve serve``
    results = run_load(cluster, range(8))                 # concurrent greedy requests
    assert_exact_or_error(results, expected)               # exact tokens, or a 5xx error
    check_invariants(cluster, {"prefill0", "decode0"})     # blocks free (counted), alive

The ``expected`` fixture (conftest.py) holds single-process greedy texts of ``prompt(i)``.
"""

import asyncio
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import yaml
import zmq

from pdserve.engine import messages as m
from tests.e2e.conftest import Served, free_port, start_serve, stop_serve

TOKEN = "fault-matrix-token"
TIMEOUT_S = 90.0  # the router's request_timeout_s unless a row sets its own
MAX_TOKENS = 16
THINGS = ["fruit", "city", "colour", "planet"]
NUM_PROMPTS = 8


STORY = "Tell me a long story about the sea, the ships and their crews. " * 20  # ~270 tok
LONG_MAX_TOKENS = 8


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: name a {THINGS[i % 4]}."}]


def long_prompt(i: int) -> list[dict]:
    """A prompt whose prefill keeps a CPU worker busy for a while (hand-offs in flight)."""
    return [{"role": "user", "content": f"Question {i}: {STORY}"}]


def fault_config(workers: list[dict], router: dict | None = None, **top) -> dict:
    """A CPU cluster config for the rows: tcp, the test token, fault injection on."""
    return {"model": "smollm2-135m", "mode": "disaggregated", "transport": "tcp",
            "cluster_token": TOKEN, "fault_injection": True,
            "router": {"request_timeout_s": TIMEOUT_S, "heartbeat_timeout_s": 3.0,
                       "loop_stall_s": 5.0, **(router or {})},
            "engine": {"device": "cpu", "num_blocks": 256, "max_num_batched_tokens": 256},
            "workers": workers, **top}


def start_cluster(cfg: dict) -> Served:
    """``pdserve serve`` on ``cfg`` (written to a temporary file) on a free port."""
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "faults.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        served = start_serve(str(path), free_port(),
                             host=cfg["router"].get("host", "127.0.0.1"))
    finally:
        shutil.rmtree(tmp)
    served.timeout_s = cfg["router"]["request_timeout_s"]
    return served


stop_cluster = stop_serve


def workers(cluster) -> dict:
    """The /status rows by worker name (polled: ``cluster.status()`` runs the CLI)."""
    return {w["name"]: w for w in cluster.poll_status()["workers"]}


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.2) -> float:
    """Seconds until ``predicate()`` held; fails the test naming ``what`` after
    ``timeout_s``."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, f"{what} (after {timeout_s:g} s)"
        time.sleep(poll_s)
    return time.monotonic() - t0


def check_invariants(cluster, alive: set[str]) -> None:
    """Once quiet: every live worker healthy, still running, every block free (counted),
    nothing running, waiting or pending."""
    cluster.wait_quiet(timeout_s=40, names=alive)
    deadline = time.monotonic() + 30  # a worker back from a stall waits out its back-off
    while True:
        by = workers(cluster)
        if all(by[n]["healthy"] for n in alive) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    for name in alive:
        w = by[name]
        assert w["healthy"], f"{name} should be alive: {w}"
        assert w["free_blocks"] == w["total_blocks"], f"{name} leaked blocks: {w}"
        assert w["running"] == 0 and w["waiting"] == 0 and w["pending_transfers"] == 0, w
        os.kill(w["pid"], 0)  # still running


async def ask(client, i: int, max_tokens: int = MAX_TOKENS, make_prompt=None, **extra):
    t0 = time.monotonic()
    messages = make_prompt(i) if make_prompt else prompt(i % NUM_PROMPTS)
    r = await client.post("/v1/chat/completions", json={
        "model": "smollm2-135m", "temperature": 0, "max_tokens": max_tokens,
        "messages": messages, **extra})
    return i, r, time.monotonic() - t0


def run_load(cluster, ids, **extra):
    """Send ``prompt(i)`` (or ``make_prompt(i)``) for every i in ``ids`` at once;
    [(i, response, seconds)]."""
    wait_ready(cluster)  # as a client would after a 503 with Retry-After
    timeout_s = getattr(cluster, "timeout_s", TIMEOUT_S)

    async def go():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=timeout_s + 30) as c:
            return await asyncio.gather(*(ask(c, i, **extra) for i in ids))

    return asyncio.run(go())


def assert_exact_or_error(results, expected, timeout_s: float = TIMEOUT_S) -> int:
    """Every request ended within its deadline, with exactly the greedy text or an
    OpenAI error (5xx); returns how many succeeded."""
    ok = 0
    for i, r, elapsed in results:
        assert elapsed < timeout_s + 10  # nothing outlived its deadline
        if r.status_code == 200:
            assert r.json()["choices"][0]["message"]["content"] == expected[i % NUM_PROMPTS]
            ok += 1
        else:
            assert r.status_code >= 500 and "error" in r.json(), r.text
    return ok


def wait_ready(cluster, timeout_s: float = 30.0) -> None:
    wait_until(lambda: httpx.get(cluster.url + "/health").status_code == 200, timeout_s,
               "the cluster did not become ready")


def send_stall(address: str, seconds: float) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(address)
    sock.send(m.encode(m.Stall(TOKEN, seconds)))
    sock.close()


def log_marks(cluster) -> int:
    """A position in the cluster's output, for ``log_matches(since=...)``."""
    return len(cluster.lines)


def log_matches(cluster, pattern: str, since: int = 0) -> list[re.Match]:
    """Matches of ``pattern`` in the output lines (router + ``[worker]`` lines) since a
    mark."""
    rx = re.compile(pattern)
    return [mt for line in cluster.lines[since:] if (mt := rx.search(line))]
