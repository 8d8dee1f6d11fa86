"""/v1/chat/completions through uvicorn with the real openai client, against the engine
driven directly."""

import openai
import pytest

from pdserve.engine.sampling_params import SamplingParams

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."
NUM_ANSWER_TOKENS = 8  # 7 text tokens + <|im_end|>


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _offline(dispatcher, ids, **kw):
    deltas = dispatcher.run_offline(ids, SamplingParams(temperature=0, **kw))
    return deltas, "".join(d.new_text for d in deltas), [t for d in deltas for t in d.new_token_ids]


def test_greedy_chat_matches_engine(idle, client, chat_ids):
    ids = chat_ids(QUESTION)
    deltas, text, _ = _offline(idle, ids, max_tokens=16)
    assert text == ANSWER
    assert (deltas[-1].finish_reason, deltas[-1].num_output_tokens) == ("stop", NUM_ANSWER_TOKENS)

    r = client.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=16,
                                       messages=[{"role": "user", "content": QUESTION}])
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-") and len(r.id) == len("chatcmpl-") + 32
    assert r.model == "smollm2-135m"
    assert len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].logprobs is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids), NUM_ANSWER_TOKENS, len(ids) + NUM_ANSWER_TOKENS)
    # the offline run left the prompt's full blocks in the prefix cache
    assert r.usage.prompt_tokens_details.cached_tokens == (len(ids) - 1) // 16 * 16


def test_streamed_parts_content_with_usage(idle, client, chat_ids):
    ids = chat_ids(QUESTION)
    parts = [{"type": "text", "text": "What is the capital "},
             {"type": "text", "text": "of France?"}]
    chunks = list(client.chat.completions.create(
        model="smollm2-135m", temperature=0, max_completion_tokens=16, stream=True,
        stream_options={"include_usage": True}, messages=[{"role": "user", "content": parts}]))
    first, *middle, last_content, usage = chunks
    assert first.object == "chat.completion.chunk"
    assert len({c.id for c in chunks}) == 1 and first.id.startswith("chatcmpl-")
    assert (first.choices[0].delta.role, first.choices[0].delta.content) == ("assistant", "")
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert last_content.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == ANSWER
    assert all(c.usage is None for c in chunks[:-1])
    assert usage.choices == []
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens,
            usage.usage.total_tokens) == (len(ids), NUM_ANSWER_TOKENS, len(ids) + 8)


def test_stream_without_usage_ends_with_finish_chunk(idle, client):
    chunks = list(client.chat.completions.create(
        model="smollm2-135m", temperature=0, max_tokens=3, stream=True,
        messages=[{"role": "user", "content": QUESTION}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The capital of"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings(idle, client, stream, include):
    kw = dict(model="smollm2-135m", temperature=0, max_tokens=16, stop=["Paris", "Lyon"],
              messages=[{"role": "user", "content": QUESTION}],
              extra_body={"include_stop_str_in_output": include})
    want = "The capital of France is Paris" if include else "The capital of France is "
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert chunks[-1].choices[0].model_extra["stop_reason"] == "Paris"
    else:
        r = client.chat.completions.create(**kw)
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].model_extra["stop_reason"] == "Paris"


def test_logprobs_shape_and_values(idle, client, chat_ids):
    ids = chat_ids(QUESTION)
    deltas, _, token_ids = _offline(idle, ids, max_tokens=4, logprobs=3)
    tok = idle.tokenizer
    r = client.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=4,
                                       logprobs=True, top_logprobs=3,
                                       messages=[{"role": "user", "content": QUESTION}])
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == [tok.decode([t]) for t in token_ids]
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert r.choices[0].message.content == "The capital of France"
    for e, d in zip(content, deltas, strict=True):
        lp = d.new_logprobs[0]
        assert e.bytes == list(e.token.encode())
        assert [t.token for t in e.top_logprobs] == [tok.decode([i]) for i, _ in lp.top]
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token  # greedy: the sampled one is the best
        assert e.logprob == pytest.approx(lp.logprob, abs=1e-4)
        assert e.top_logprobs[0].logprob == e.logprob

    chunks = list(client.chat.completions.create(
        model="smollm2-135m", temperature=0, max_tokens=4, logprobs=True, stream=True,
        messages=[{"role": "user", "content": QUESTION}]))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in streamed)  # logprobs without top_logprobs
