"""The product's main job end to end: ``pdserve serve configs/local.yaml`` (real router,
prefill and decode processes, KV over TCP) against the unmodified openai client."""

import asyncio
import time

import httpx
import pytest
import torch

from pdserve import SamplingParams
from pdserve.engine.tokenizer import apply_chat_template
from tests.e2e.conftest import free_port, start_serve, stop_serve

TOKEN = "e2e-cluster-token"
QUESTIONS = ["What is the capital of France?",
             "Write two sentences about the moon and its phases."]


@pytest.fixture(scope="module")
def served():
    import shutil
    from pathlib import Path

    port = free_port()
    local = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"
    tmp = Path(__import__("tempfile").mkdtemp())
    cfg = tmp / "local.yaml"
    shutil.copy(local, cfg)
    with open(cfg, "a") as f:  # the shipped config, plus a token this test knows
        f.write(f"cluster_token: {TOKEN}\n")
    # test_timeout_* waits this out; the slowest other request (32 streams at once) takes
    # 5-7 s on a 2-core box
    cfg.write_text(cfg.read_text().replace("request_timeout_s: 600", "request_timeout_s: 15"))
    s = start_serve(str(cfg), port)
    yield s
    assert stop_serve(s) == 0
    assert any("pdserve: stopped" in ln for ln in s.lines)
    shutil.rmtree(tmp)


def test_greedy_chat_matches_llm_and_transformers(served, reference_llm, hf_model):
    from openai import OpenAI

    client = OpenAI(base_url=served.url + "/v1", api_key="unused")
    before = served.status()
    for q in QUESTIONS:
        messages = [{"role": "user", "content": q}]
        ref = reference_llm.chat(messages, SamplingParams(temperature=0, max_tokens=48),
                                 use_tqdm=False)[0]
        ids = apply_chat_template(reference_llm.tokenizer, messages)
        with torch.no_grad():
            hf = hf_model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        hf_new = hf[0, len(ids):].tolist()
        if 2 in hf_new:
            hf_new = hf_new[:hf_new.index(2) + 1]
        assert ref.token_ids == hf_new
        resp = client.chat.completions.create(model="smollm2-135m", messages=messages,
                                              temperature=0, max_tokens=48)
        assert resp.choices[0].message.content == ref.text
        assert resp.usage.completion_tokens == len(ref.token_ids)
        assert resp.usage.prompt_tokens == len(ids)
        stream = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": [
                {"type": "text", "text": q}]}], temperature=0, max_tokens=48, stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        assert text == ref.text
        assert usage.completion_tokens == len(ref.token_ids)
    st = served.wait_quiet()
    by = {w["name"]: w for w in st["workers"]}
    sent = by["prefill0"]["kv_bytes_sent"] - _get(before, "prefill0", "kv_bytes_sent")
    received = by["decode0"]["kv_bytes_received"] - _get(before, "decode0", "kv_bytes_received")
    assert sent > 0 and sent == received
    assert st["routing"]["remote_prefill"] >= 4
    assert by["prefill0"]["role"] == "prefill" and by["decode0"]["role"] == "decode"
    assert by["prefill0"]["healthy"] and by["decode0"]["healthy"]


def _get(status, name, key):
    return next(w[key] for w in status["workers"] if w["name"] == name)


async def _stream_one(client, i):
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json={
            "model": "smollm2-135m", "stream": True, "temperature": 0, "max_tokens": 12 + i % 7,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Count from {i} to {i + 20}."}]}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                assert '"error"' not in line
                text += line
    return text


def test_thirty_two_concurrent_streams_then_all_blocks_free(served):
    async def run():
        async with httpx.AsyncClient(base_url=served.url, timeout=300) as client:
            return await asyncio.gather(*(_stream_one(client, i) for i in range(32)))

    outs = asyncio.run(run())
    assert len(outs) == 32 and all('"finish_reason":"length"' in o for o in outs)
    st = served.wait_quiet()
    for w in st["workers"]:
        assert w["free_blocks"] == w["total_blocks"], w


def test_disconnect_mid_stream_frees_blocks_on_both_workers(served):
    with httpx.Client(base_url=served.url, timeout=60) as client, client.stream(
            "POST", "/v1/chat/completions", json={
                "model": "smollm2-135m", "stream": True, "max_tokens": 2000,
                "ignore_eos": True, "messages": [{"role": "user", "content": "Tell a story."}]
            }) as r:
        n = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                n += 1
            if n >= 5:
                break  # leave mid-stream
    time.sleep(0.5)
    st = served.wait_quiet()
    for w in st["workers"]:
        assert w["free_blocks"] == w["total_blocks"] and w["running"] == 0, w


def test_timeout_frees_blocks_on_both_workers(served):
    with httpx.Client(base_url=served.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json={
            "model": "smollm2-135m", "max_tokens": 6000, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a very long story."}]})
    assert r.status_code == 504 and r.json()["error"]["message"]
    st = served.wait_quiet()
    for w in st["workers"]:
        assert w["free_blocks"] == w["total_blocks"] and w["running"] == 0, w


def test_bad_requests_get_openai_errors_and_server_keeps_serving(served):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/chat/completions", json={"model": "smollm2-135m", "messages": []})
        assert r.status_code == 400
        r = c.post("/v1/chat/completions", json={"model": "nope", "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/chat/completions", json={"model": "smollm2-135m", "max_tokens": 0,
                                                 "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400
        r = c.post("/v1/chat/completions", json={"model": "smollm2-135m", "messages": [
            {"role": "user", "content": "word " * 9000}]})
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"model": "smollm2-135m", "n": 2, "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 400
        r = c.post("/v1/chat/completions", json={"model": "smollm2-135m", "max_tokens": 3,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def _control_address(served) -> str:
    line = next(ln for ln in served.lines if "pdserve: control plane at" in ln)
    return line.rsplit(" ", 1)[1].strip()


@pytest.mark.parametrize("change, message", [
    ({"token": "not-the-cluster-token"}, "cluster token mismatch"),
    ({"engine": {"block_size": 32}}, "block_size mismatch: cluster uses 16"),
])
def test_worker_with_wrong_token_or_block_size_is_refused(served, change, message):
    import json
    import subprocess
    import sys

    spec = {"worker_id": "intruder", "role": "decode",
            "control_address": _control_address(served), "token": "x",
            "engine": {"model": "smollm2-135m", "device": "cpu", "num_blocks": 64}}
    if "token" not in change:  # right token, wrong block size
        spec["token"] = TOKEN
    spec.update({k: v for k, v in change.items() if k != "engine"})
    spec["engine"].update(change.get("engine", {}))
    proc = subprocess.run([sys.executable, "-m", "pdserve.decode", json.dumps(spec)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert message in proc.stdout
    assert "router refused registration" in proc.stdout
    names = [w["name"] for w in served.status()["workers"]]
    assert "intruder" not in names
