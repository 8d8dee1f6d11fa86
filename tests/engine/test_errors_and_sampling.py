"""Bad input gets a clear error and the engine stays usable; sampling options work."""

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.weights import ModelNotFoundError


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m", num_blocks=256, max_model_len=512)


def test_missing_model_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        LLM(str(missing))


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"logprobs": 50}, "logprobs must be in"),
    ({"n": 2}, "n must be 1"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context_then_still_usable(llm):
    long_prompt = [5] * 600
    with pytest.raises(ValueError, match="prompt has 600 tokens, the model's context is 512"):
        llm.generate([long_prompt, [1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished()  # nothing of the bad batch was queued
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="token ids must be integers"):
        llm.generate([[10**9]], SamplingParams(), use_tqdm=False)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.token_ids) == 3
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


def test_max_tokens_is_clipped_to_context(llm):
    prompt = [7] * 505
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=12,
                       ignore_eos=True)
    a = llm.generate("Once upon a time", p, use_tqdm=False)[0]
    b = llm.generate(["Once upon a time", "Unrelated prompt in the same batch"],
                     [p, SamplingParams(temperature=1.0, max_tokens=5)], use_tqdm=False)[0]
    assert a.token_ids == b.token_ids
    c = llm.generate("Once upon a time", SamplingParams(
        temperature=0.9, top_p=0.9, top_k=50, seed=999, max_tokens=12, ignore_eos=True),
        use_tqdm=False)[0]
    assert c.token_ids != a.token_ids


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate("The ocean is", SamplingParams(temperature=0, max_tokens=8,
                                                         ignore_eos=True), use_tqdm=False)[0]
    topk1 = llm.generate("The ocean is", SamplingParams(temperature=1.3, top_k=1, seed=3,
                                                        max_tokens=8, ignore_eos=True),
                         use_tqdm=False)[0]
    assert topk1.token_ids == greedy.token_ids


def test_stop_strings_and_stop_token_ids(llm):
    base = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate("Count: 1, 2, 3,", base, use_tqdm=False)[0]
    assert len(full.text) > 6
    stop = full.text[4:6]
    cut = llm.generate("Count: 1, 2, 3,", SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]), use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    assert cut.text == full.text[:full.text.find(stop)]
    tid = full.token_ids[3]
    by_id = llm.generate("Count: 1, 2, 3,", SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[tid]),
        use_tqdm=False)[0]
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(tid) + 1]
    assert by_id.finish_reason == "stop" and by_id.outputs[0].stop_reason == tid
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


def test_logprobs_top_n(llm):
    out = llm.generate("Paris is the capital of", SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logprobs=3), use_tqdm=False)[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for tok, lp in zip(out.token_ids, lps, strict=True):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy: the sampled token is the most likely
        assert lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob <= 0
