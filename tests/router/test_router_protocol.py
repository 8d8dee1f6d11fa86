"""protocol.py and sse.py without a server: parsed values and exact response shapes."""

import pytest

from pdserve.engine.messages import SamplingSpec, TokenDelta
from pdserve.router.protocol import ApiError, parse_chat, parse_completion, parse_json
from pdserve.router.sse import SSE_DONE, ResponseBuilder, sse_event

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tok(dispatcher):
    return dispatcher.tokenizer


def test_chat_defaults_fill_the_context(tok, chat_ids):
    req = parse_chat({"messages": USER, "user": "ignored", "tools": []}, "m", 100, tok)
    n = len(chat_ids("Hi"))
    assert req.prompt_token_ids == chat_ids("Hi")
    assert (req.kind, req.stream, req.include_usage) == ("chat", False, False)
    assert req.sampling == SamplingSpec(temperature=1.0, top_p=1.0, max_tokens=100 - n)


def test_chat_fields_map_to_sampling(tok):
    req = parse_chat({"model": "m", "messages": USER, "max_tokens": 9, "max_completion_tokens": 7,
                      "temperature": 0, "top_p": 0.5, "top_k": -1, "seed": 3, "stop": "x",
                      "logprobs": True, "top_logprobs": 2, "ignore_eos": True, "stream": True,
                      "stream_options": {"include_usage": True}, "presence_penalty": 0,
                      "stop_token_ids": [5]}, "m", 100, tok)
    assert req.sampling == SamplingSpec(temperature=0.0, top_p=0.5, top_k=None, seed=3,
                                        max_tokens=7, stop=["x"], stop_token_ids=[5],
                                        ignore_eos=True, logprobs=2)
    assert (req.stream, req.include_usage) == (True, True)


def test_completion_prompt_forms(tok):
    ids = tok.encode("Hello there")
    for prompt in ("Hello there", ["Hello there"], ids, [ids]):
        req = parse_completion({"prompt": prompt, "logprobs": 0}, "m", 100, tok)
        assert req.prompt_token_ids == ids
        assert req.sampling.logprobs == 0
    assert parse_completion({"prompt": ids}, "m", 100, tok).sampling.logprobs is None


def test_prompt_exactly_at_the_limit_is_refused(tok):
    ids = tok.encode("Hello there")
    parse_completion({"prompt": ids}, "m", len(ids) + 1, tok)
    with pytest.raises(ApiError) as e:
        parse_completion({"prompt": ids}, "m", len(ids), tok)
    assert (e.value.status_code, e.value.code) == (400, "context_length_exceeded")
    assert e.value.message == (f"This model's maximum context length is {len(ids)} tokens, but "
                               f"the prompt has {len(ids)} tokens (it must leave room for at "
                               "least one new token).")


def test_parse_json_errors():
    assert parse_json(b'{"a": 1}') == {"a": 1}
    for raw, msg in ((b"\xff", "not valid JSON"), (b"", "not valid JSON"),
                     (b'"x"', "must be a JSON object, got a string")):
        with pytest.raises(ApiError, match=msg):
            parse_json(raw)


def test_chunks_and_response_shapes(tok):
    b = ResponseBuilder("chat", "chatcmpl-1", "m", 7, tok, num_prompt_tokens=5,
                        include_usage=True)
    assert b.first_chunk() == {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}], "usage": None}
    hi = tok.encode("Hi")[0]
    assert b.chunk(TokenDelta("r", [hi], "Hi", num_output_tokens=1))["choices"] == [
        {"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}]
    assert b.chunk(TokenDelta("r", [2], "", num_output_tokens=2)) is None
    last = b.chunk(TokenDelta("r", [2], "", finished=True, finish_reason="stop",
                              num_output_tokens=3, num_cached_tokens=0))
    assert last["choices"] == [{"index": 0, "delta": {}, "logprobs": None,
                                "finish_reason": "stop", "stop_reason": None}]
    assert b.usage_chunk()["choices"] == []
    assert b.usage_chunk()["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                        "total_tokens": 8,
                                        "prompt_tokens_details": {"cached_tokens": 0}}
    assert b.response()["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}
    assert sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"


def test_logprobs_of_minus_infinity_stay_json(tok):
    b = ResponseBuilder("completion", "cmpl-1", "m", 7, tok, num_prompt_tokens=1)
    b.add(TokenDelta("r", [2], "", logprobs=[[2, float("-inf"), [[2, float("-inf")]]]]))
    lp = b.response()["choices"][0]["logprobs"]
    assert lp == {"tokens": ["<|im_end|>"], "token_logprobs": [-9999.0],
                  "top_logprobs": [{"<|im_end|>": -9999.0}], "text_offset": [0]}
