"""Fault matrix row 11: schemathesis over the live router's OpenAPI schema in negative mode
(every body violates the schema: wrong types, missing or out-of-range fields, bad enum
values), plus oversized prompts and out-of-range numbers: only 4xx, never 5xx, and the
next valid request gets exactly the greedy tokens.

The request-body schemas come from ``router/openapi.py``; they state only what the
router enforces, so a 200 here would mean the schema and the router disagree.
Examples per operation are bounded (``MAX_EXAMPLES``) to keep the row under a minute.
"""

import collections
import json

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode

from tests.e2e.faults import (
    assert_exact_or_error,
    check_invariants,
    fault_config,
    prompt,
    run_load,
    start_cluster,
    stop_cluster,
)

MAX_EXAMPLES = 60  # per operation and phase
MAX_MODEL_LEN = 1024
SEEN: collections.Counter = collections.Counter()  # (path, status) of every negative case


@pytest.fixture(scope="module")
def cluster():
    s = start_cluster(fault_config(
        [{"name": "prefill0", "role": "prefill"}, {"name": "decode0", "role": "decode"}],
        router={"request_timeout_s": 30.0},
        engine={"device": "cpu", "num_blocks": 256, "max_num_batched_tokens": 256,
                "max_model_len": MAX_MODEL_LEN}))
    yield s
    stop_cluster(s)


@pytest.fixture(scope="module")
def router_schema(cluster):
    schema = schemathesis.openapi.from_url(cluster.url + "/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.NEGATIVE],
                                    max_examples=MAX_EXAMPLES, deterministic=True,
                                    database="none")
    return schema.include(method="POST")


schema = schemathesis.pytest.from_fixture("router_schema").include(method="POST")


@schema.parametrize()
def test_row11_negative_bodies_get_4xx_never_5xx(case):
    response = case.call(timeout=30)
    SEEN[(case.operation.path, response.status_code)] += 1
    assert 400 <= response.status_code < 500, (response.status_code, case.body,
                                               response.text[:500])
    if response.status_code != 405:  # 405 (a method the path lacks) is Starlette's
        assert set(response.json()["error"]) >= {"message", "type", "param", "code"}


def chat(**body) -> dict:
    return {"model": "smollm2-135m", "messages": prompt(0), "max_tokens": 4, **body}


OVERSIZED = [
    ("chat", chat(messages=[{"role": "user", "content": "word " * 2 * MAX_MODEL_LEN}]),
     "context_length_exceeded"),
    ("chat", chat(max_tokens=MAX_MODEL_LEN), "context_length_exceeded"),
    ("chat", chat(max_tokens=2**70), None),
    ("chat", chat(messages=[{"role": "user", "content": "x" * (4 << 20)}]),
     "context_length_exceeded"),  # a 4 MiB body
    ("chat", chat(messages=prompt(0) * 3000), "context_length_exceeded"),
    ("completion", {"prompt": [1] * (MAX_MODEL_LEN + 1), "max_tokens": 1},
     "context_length_exceeded"),
    ("completion", {"prompt": [2**70], "max_tokens": 1}, None),
    ("chat", chat(seed=2**70), None),
    ("chat", chat(seed=-(2**70)), None),
    ("chat", chat(stop_token_ids=[2**70]), None),
    ("chat", chat(top_k=2**70), None),
    ("chat", chat(temperature=1e308 * 10), None),  # json: Infinity
    ("chat", chat(slo={"ttft_ms": 10**400}), None),
    ("chat", '{"messages": [{"role": "user", "content": "hi"}], "seed": ' + "9" * 5000 + "}",
     None),  # a number longer than Python converts
    ("chat", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', None),  # not UTF-8
]


@pytest.mark.parametrize("kind,body,code", OVERSIZED,
                         ids=[f"{i}-{k}" for i, (k, _, _) in enumerate(OVERSIZED)])
def test_row11_oversized_and_out_of_range_get_4xx_then_a_request_succeeds(
        cluster, expected, kind, body, code):
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    raw = body if isinstance(body, str | bytes) else json.dumps(body)  # Infinity, huge ints
    r = httpx.post(cluster.url + path, content=raw, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if code is not None:
        assert r.json()["error"]["code"] == code, r.text[:300]
    assert assert_exact_or_error(run_load(cluster, [0]), expected) == 1


def test_row11_invariants_after_the_fuzzing(cluster, expected):
    assert sum(SEEN.values()) >= 2 * MAX_EXAMPLES or not SEEN  # the fuzzing ran
    assert all(400 <= status < 500 for _, status in SEEN)
    assert assert_exact_or_error(run_load(cluster, range(4)), expected) == 4
    check_invariants(cluster, {"prefill0", "decode0"})
