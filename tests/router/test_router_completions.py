"""/v1/completions (string and token-id prompts, legacy logprobs) and /v1/models."""

import httpx
import openai
import pytest

from pdserve.engine.sampling_params import SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_string_and_token_prompts_match_engine(idle, client):
    ids = idle.tokenizer.encode(PROMPT)
    deltas = idle.run_offline(ids, SamplingParams(temperature=0, max_tokens=5))
    want = "".join(d.new_text for d in deltas)
    assert len(want) > 0 and deltas[-1].finish_reason == "length"

    r = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=5,
                                  temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids), 5, len(ids) + 5)

    r2 = client.completions.create(model="smollm2-135m", prompt=ids, max_tokens=5,
                                   temperature=0)
    assert r2.choices[0].text == want

    chunks = list(client.completions.create(model="smollm2-135m", prompt=ids, max_tokens=5,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == want
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_legacy_logprobs(idle, client):
    ids = idle.tokenizer.encode(PROMPT)
    deltas = idle.run_offline(ids, SamplingParams(temperature=0, max_tokens=3, logprobs=2))
    tok = idle.tokenizer
    r = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=3,
                                  temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    tokens = [tok.decode([d.new_token_ids[0]]) for d in deltas]
    assert lp.tokens == tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [0, len(tokens[0]), len(tokens[0]) + len(tokens[1])]
    for got, top, d in zip(lp.token_logprobs, lp.top_logprobs, deltas, strict=True):
        want = d.new_logprobs[0]
        assert got == pytest.approx(want.logprob, abs=1e-4)
        assert list(top) == [tok.decode([i]) for i, _ in want.top]  # greedy: sampled is top 1
        assert max(top.values()) == got


def test_models(server):
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 200
    assert r.json() == {"object": "list", "data": [{
        "id": "smollm2-135m", "object": "model", "created": 0, "owned_by": "pdserve",
        "max_model_len": 8192}]}
