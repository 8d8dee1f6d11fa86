"""Bad requests get OpenAI error JSON with the right status; the server keeps serving.
API keys, when configured, are required on /v1/*."""

import httpx
import openai
import pytest

USER = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = {"model": "smollm2-135m", "messages": USER, "max_tokens": 3, "temperature": 0}
COMPLETION = {"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 3,
              "temperature": 0}

# (endpoint, body changes, status, param, code, a piece of the message)
CASES = [
    ("chat", {"messages": None}, 400, "messages", None, "'messages' is required"),
    ("chat", {"messages": []}, 400, "messages", None, "'messages' must not be empty"),
    ("chat", {"messages": "hi"}, 400, "messages", None, "must be an array, got a string"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None,
     "messages[0].role must be one of system, user, assistant, tool, developer, got 'wizard'"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages", None,
     "messages[0].content must be a string or a list of text parts"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", None, "messages[0].content[0] must be a text part"),
    ("chat", {"model": "gpt-4o"}, 404, "model", "model_not_found",
     "The model `gpt-4o` does not exist."),
    ("chat", {"model": 7}, 400, "model", None, "'model' must be a string, got an integer"),
    ("chat", {"max_tokens": 0}, 400, "max_tokens", None, "'max_tokens' must be >= 1, got 0"),
    ("chat", {"max_completion_tokens": -3}, 400, "max_completion_tokens", None, ">= 1, got -3"),
    ("chat", {"max_tokens": "5"}, 400, "max_tokens", None,
     "'max_tokens' must be an integer, got a string"),
    ("chat", {"max_tokens": 8190}, 400, "max_tokens", "context_length_exceeded",
     "maximum context length is 8192 tokens, but 8227 were requested (37 in the prompt, "
     "8190 for the completion)"),
    ("chat", {"temperature": 2.5}, 400, "temperature", None,
     "'temperature' must be in [0, 2], got 2.5"),
    ("chat", {"temperature": "hot"}, 400, "temperature", None, "must be a number, got a string"),
    ("chat", {"top_p": 0}, 400, "top_p", None, "'top_p' must be in (0, 1], got 0"),
    ("chat", {"top_p": 1.5}, 400, "top_p", None, "'top_p' must be in (0, 1], got 1.5"),
    ("chat", {"n": 2}, 400, "n", None, "'n' must be 1"),
    ("chat", {"presence_penalty": 0.5}, 400, "presence_penalty", None,
     "'presence_penalty' is not supported (only 0)"),
    ("chat", {"frequency_penalty": 1}, 400, "frequency_penalty", None, "not supported"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None, "at most 4 strings, got 5"),
    ("chat", {"stop": 3}, 400, "stop", None, "'stop' must be a string or an array of strings"),
    ("chat", {"stream": "yes"}, 400, "stream", None, "'stream' must be a boolean"),
    ("chat", {"stream_options": {"include_usage": True}}, 400, "stream_options", None,
     "only allowed when 'stream' is true"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None,
     "'top_logprobs' must be in [0, 20], got 21"),
    ("chat", {"top_logprobs": 2}, 400, "top_logprobs", None, "'logprobs' must be true"),
    ("completion", {"prompt": ["a", "b"]}, 400, "prompt", None,
     "batched prompts are not supported (2 prompts)"),
    ("completion", {"prompt": []}, 400, "prompt", None, "non-empty array of token ids"),
    ("completion", {"prompt": None}, 400, "prompt", None, "'prompt' is required"),
    ("completion", {"prompt": [1, 99999999]}, 400, "prompt", None,
     "'prompt' token ids must be in [0, 49152)"),
    ("completion", {"logprobs": 6}, 400, "logprobs", None, "'logprobs' must be in [0, 5], got 6"),
    ("completion", {"echo": True}, 400, "echo", None, "'echo' is not supported"),
]


def _post(url: str, kind: str, body) -> httpx.Response:
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    return httpx.post(url + path, json=body, timeout=30)


def _check_error(r: httpx.Response, status: int, param, code, message_part: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert (err["param"], err["code"]) == (param, code)
    assert message_part in err["message"]


@pytest.mark.parametrize(("kind", "change", "status", "param", "code", "message"), CASES)
def test_bad_request(server, kind, change, status, param, code, message):
    body = {**(CHAT if kind == "chat" else COMPLETION), **change}
    body = {k: v for k, v in body.items() if v is not None}
    _check_error(_post(server.url, kind, body), status, param, code, message)


def test_bad_bodies_then_good_request(idle, server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": ', timeout=30)
    _check_error(r, 400, None, None, "the request body is not valid JSON")
    r = httpx.post(server.url + "/v1/chat/completions", json=[1, 2], timeout=30)
    _check_error(r, 400, None, None, "the request body must be a JSON object, got an array")
    long_prompt = "hello " * 9000
    n = len(idle.tokenizer.encode(long_prompt))
    r = _post(server.url, "completion", {**COMPLETION, "prompt": long_prompt})
    _check_error(r, 400, "prompt", "context_length_exceeded",
                 f"This model's maximum context length is 8192 tokens, but the prompt has {n} "
                 "tokens")
    assert n > 8192

    r = _post(server.url, "chat", CHAT)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "The capital of"


def test_api_key_required(idle, make_server):
    s = make_server(api_keys=["sk-test"])
    r = httpx.post(s.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(s.url + "/v1/models").status_code == 401
    assert httpx.get(s.url + "/health").status_code == 200  # not under /v1

    bad = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**CHAT)
    good = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test", max_retries=0)
    r = good.chat.completions.create(**CHAT)
    assert r.choices[0].message.content == "The capital of"
    assert [m.id for m in good.models.list()] == ["smollm2-135m"]


def test_request_id_header_is_echoed_not_used(idle, server):
    r = httpx.post(server.url + "/v1/chat/completions", json=CHAT,
                   headers={"X-Request-Id": "client-42"}, timeout=30)
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "client-42"
    assert "client-42" not in r.json()["id"]
