"""The same path with the NIXL transport and in colocated mode; time-outs free blocks."""

import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from pdserve import SamplingParams
from tests.e2e.conftest import free_port, start_serve, stop_serve

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module", params=["local-nixl.yaml", "local-colocated.yaml"])
def served(request):
    if request.param == "local-nixl.yaml":
        pytest.importorskip("nixl")
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / request.param
    shutil.copy(CONFIGS / request.param, cfg)
    with open(cfg, "a") as f:
        f.write("cluster_token: variants-token\n")
    # test_timeout_* waits the colocated one out; its other requests take ~2 s each
    timeout = 10 if request.param == "local-colocated.yaml" else 300
    text = cfg.read_text().replace("router:\n", f"router:\n  request_timeout_s: {timeout}\n", 1)
    cfg.write_text(text)
    s = start_serve(str(cfg), free_port())
    s.variant = request.param
    yield s
    assert stop_serve(s) == 0
    shutil.rmtree(tmp)


def test_greedy_chat_matches_offline(served, reference_llm):
    from openai import OpenAI

    ref = reference_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=40),
                             use_tqdm=False)[0]
    client = OpenAI(base_url=served.url + "/v1", api_key="unused")
    resp = client.chat.completions.create(model="smollm2-135m", messages=MESSAGES,
                                          temperature=0, max_tokens=40)
    assert resp.choices[0].message.content == ref.text
    assert resp.usage.completion_tokens == len(ref.token_ids)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2-135m", messages=MESSAGES, temperature=0, max_tokens=40, stream=True)
        if c.choices)
    assert text == ref.text
    st = served.wait_quiet()
    by_role = {w["role"]: w for w in st["workers"]}
    if served.variant == "local-nixl.yaml":
        assert by_role["prefill"]["kv_bytes_sent"] > 0
        assert by_role["prefill"]["kv_bytes_sent"] == by_role["decode"]["kv_bytes_received"]
        assert st["routing"]["remote_prefill"] == 2
    else:
        assert set(by_role) == {"colocated"}
        assert all(w["kv_bytes_sent"] == 0 and w["kv_bytes_received"] == 0
                   for w in st["workers"])
        assert st["routing"] == {"remote_prefill": 0, "local_prefill": 2}


def test_timeout_returns_504_and_frees_blocks(served):
    if served.variant != "local-colocated.yaml":
        pytest.skip("time-outs are exercised on the colocated server (10 s); disaggregated "
                    "time-outs in test_serve_local and the fault matrix")
    with httpx.Client(base_url=served.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json={
            "model": "smollm2-135m", "max_tokens": 5000, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a very long story."}]})
    assert r.status_code == 504
    assert r.json()["error"]["message"]
    st = served.wait_quiet()
    for w in st["workers"]:
        assert w["free_blocks"] == w["total_blocks"] and w["running"] == 0, w
