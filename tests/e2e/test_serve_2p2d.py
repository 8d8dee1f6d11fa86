"""Prefix-aware routing on a real cluster: ``configs/local-2p2d.yaml`` (router, two prefill
and two decode processes, SmolLM2, KV over TCP), proved by the workers' own counters.

    round 1  A1, B1 at once, no shared prefix     -> one prefill worker each (by load)
    round 2  A2, B2 at once, each sharing >= 300  -> A2 on the worker that computed A1,
             tokens with round 1's prompt            B2 on the one that computed B1; each
                                                     computes only its uncached suffix

A worker's ``prefill_tokens`` (tokens it computed) and ``prefix_cached_tokens`` (prompt
tokens its prefix cache held) come from its load reports, via the router's /status.
Prompts go through /v1/completions as raw text, so no chat template adds a shared
system prompt. At the end every block of every worker is free again.
"""

import asyncio
import random
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import free_port, start_serve, stop_serve

pytestmark = pytest.mark.timeout(240)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local-2p2d.yaml"
PREFILLS, DECODES = ("prefill0", "prefill1"), ("decode0", "decode1")
BLOCK = 16
WORDS = ["river", "stone", "quantum", "bread", "orbit", "violin", "harbor", "maple", "engine",
         "cloud", "ledger", "tiger", "copper", "poem", "lantern", "delta", "garden", "signal"]


def text(title: str, seed: int, num_words: int) -> str:
    rng = random.Random(seed)
    return title + " " + " ".join(rng.choice(WORDS) for _ in range(num_words))


A = text("Field notes from the northern survey:", 1, 330)
B = text("Minutes of the harbour committee meeting:", 2, 370)


@pytest.fixture(scope="module")
def served():
    tmp = Path(tempfile.mkdtemp())
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["cluster_token"] = "two-by-two-token"
    cfg["router"]["request_timeout_s"] = 60
    cfg["engine"]["num_blocks"] = 256  # plenty for these prompts, quick to allocate
    path = tmp / "local-2p2d.yaml"
    path.write_text(yaml.safe_dump(cfg))
    s = start_serve(str(path), free_port())
    yield s
    assert stop_serve(s) == 0
    shutil.rmtree(tmp)


@pytest.fixture(scope="module")
def tok():
    from pdserve.engine.tokenizer import load_tokenizer
    from pdserve.engine.weights import resolve_model_dir

    return load_tokenizer(resolve_model_dir("smollm2-135m"))


def complete(served, prompts: list[str]) -> list[dict]:
    """POST the prompts at once; their usage blocks, in order."""
    async def one(client, prompt):
        r = await client.post("/v1/completions", json={
            "model": "smollm2-135m", "prompt": prompt, "max_tokens": 3, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    async def run():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    return asyncio.run(run())


def quiet(served, num_requests: int = 0, timeout_s: float = 30.0) -> dict:
    """The router's /status once every worker reports all blocks free, nothing running,
    and ``num_requests`` started prompts in all (or the time-out passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = httpx.get(served.url + "/status", timeout=10).json()
        ws = st["workers"]
        if all(w["free_blocks"] == w["total_blocks"] and w["running"] == w["waiting"]
               == w["pending_transfers"] == 0 for w in ws) and \
                sum(w["prefill_requests"] for w in ws) >= num_requests:
            return st
        if time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def counters(served, num_requests: int) -> dict:
    """Per worker (prefill_requests, prefill_tokens, prefix_cached_tokens), once quiet
    after ``num_requests`` started prompts; plus the router's routing counts."""
    st = quiet(served, num_requests)
    by = {w["name"]: w for w in st["workers"]}
    return {n: (w["prefill_requests"], w["prefill_tokens"], w["prefix_cached_tokens"])
            for n, w in by.items()} | {"routing": st["routing"]}


def delta(after: dict, before: dict, name: str) -> tuple[int, int, int]:
    return tuple(a - b for a, b in zip(after[name], before[name], strict=True))


def common_blocks(tok, x: str, y: str) -> int:
    ids_x, ids_y = tok.encode(x), tok.encode(y)
    n = next((i for i, (a, b) in enumerate(zip(ids_x, ids_y, strict=False)) if a != b),
             min(len(ids_x), len(ids_y)))
    return n // BLOCK


def test_shared_prefixes_go_to_the_prefill_worker_holding_them(served, tok):
    before = counters(served, 0)
    a1, b1 = A + " Question one: which word comes first?", B + " Item one: the budget."
    ua1, ub1 = complete(served, [a1, b1])
    assert ua1["prompt_tokens"] != ub1["prompt_tokens"]  # tells the workers apart below
    assert ua1["prompt_tokens_details"]["cached_tokens"] == 0
    assert ub1["prompt_tokens_details"]["cached_tokens"] == 0
    r1 = counters(served, 2)
    # round 1: nothing shared, so one prompt per prefill worker (by queued tokens)
    got = {n: delta(r1, before, n) for n in PREFILLS}
    computed = sorted((d[1], n) for n, d in got.items())
    assert [c for c, _ in computed] == sorted([ua1["prompt_tokens"], ub1["prompt_tokens"]])
    assert all(d[0] == 1 and d[2] == 0 for d in got.values()), got
    holder = {"A": next(n for n, d in got.items() if d[1] == ua1["prompt_tokens"]),
              "B": next(n for n, d in got.items() if d[1] == ub1["prompt_tokens"])}
    assert set(holder.values()) == set(PREFILLS)

    # round 2: each prompt shares >= 300 tokens with one of round 1's
    a2, b2 = A + " Question two: which words repeat most?", B + " Item two: the new pier."
    ua2, ub2 = complete(served, [a2, b2])
    r2 = counters(served, 4)
    for key, first, second, usage in (("A", a1, a2, ua2), ("B", b1, b2, ub2)):
        cached = common_blocks(tok, first, second) * BLOCK
        assert cached >= 300
        assert usage["prompt_tokens_details"]["cached_tokens"] == cached
        hit = delta(r2, r1, holder[key])  # (prompts, tokens computed, tokens cached)
        assert hit == (1, usage["prompt_tokens"] - cached, cached), (key, hit)
    for name in DECODES:  # no decode worker prefilled anything itself
        assert delta(r2, before, name)[:2] == (0, 0)
    assert r2["routing"]["remote_prefill"] - before["routing"]["remote_prefill"] == 4
    assert r2["routing"]["local_prefill"] == before["routing"]["local_prefill"]


def test_every_block_is_free_again(served):
    st = quiet(served)
    assert {w["name"] for w in st["workers"]} == set(PREFILLS + DECODES)
    for w in st["workers"]:
        assert w["healthy"] and w["free_blocks"] == w["total_blocks"] == 256, w
        assert w["running"] == w["waiting"] == w["pending_transfers"] == 0, w
