"""Continuous batching, prefix reuse and preemption on the real model."""

import random

import pytest

from pdserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m", max_num_batched_tokens=256, num_blocks=512)


def random_prompts(tokenizer, n, seed, max_words=150):
    rng = random.Random(seed)
    words = ["river", "stone", "quantum", "bread", "orbit", "violin", "harbor", "maple",
             "engine", "cloud", "ledger", "tiger", "copper", "poem", "lantern", "delta"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, max_words))) for _ in range(n)]


def test_sixteen_concurrent_equal_each_alone(llm):
    prompts = random_prompts(llm.tokenizer, 16, seed=random.randrange(1 << 30), max_words=80)
    params = [SamplingParams(temperature=0, max_tokens=2 + i % 8, ignore_eos=True)
              for i in range(16)]
    together = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_running == 0
    for prompt, p, out in zip(prompts, params, together, strict=True):
        alone = llm.generate(prompt, p, use_tqdm=False)[0]
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == p.max_tokens
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


def test_shared_prefix_computes_only_the_suffix(llm):
    tok = llm.tokenizer
    llm.engine.pool.reset_prefix_cache()
    prefix = tok.encode(" ".join(f"item{i}" for i in range(120)))[:200]
    assert len(prefix) == 200
    first = prefix + tok.encode(" first question?")
    second = prefix + tok.encode(" a different ending here")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm.generate([first], params, use_tqdm=False)
    engine = llm.engine
    rid = "prefix-check"
    req = engine.add_request(rid, second, params)
    while engine.has_unfinished():
        engine.step()
    cached = (200 // 16) * 16  # full blocks of the shared prefix
    assert req.num_cached_tokens == cached
    # Computed = the uncached prompt suffix + the generated tokens fed back (all but last).
    assert req.num_computed_total == len(second) - cached + 6 - 1
    assert engine.pool.reset_prefix_cache()
    cold = llm.generate([second], params, use_tqdm=False)[0]
    assert cold.num_cached_tokens == 0
    assert cold.token_ids == req.output_token_ids


def test_preemption_completes_every_request_and_frees_every_block():
    small = LLM("smollm2-135m", num_blocks=12, max_num_batched_tokens=128)
    prompts = random_prompts(small.tokenizer, 6, seed=7, max_words=40)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert all(len(o.token_ids) == 20 and o.finish_reason == "length" for o in outs)
    assert small.engine.pool.num_free_blocks == 12
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.scheduler.num_running == 0 and small.engine.scheduler.num_waiting == 0
