"""Greedy decoding equals transformers' on the same weights (the correctness oracle)."""

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.tokenizer import apply_chat_template

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning, my friend' into Spanish.",
    "def fibonacci(n):\n    # complete this Python function",
    "Summarize the plot of Romeo and Juliet. " * 12,  # longer than one prefill chunk
    "Tell me a story about a robot who learns to paint, in the style of a fairy tale.",
]
CHUNK = 64


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m", max_num_batched_tokens=CHUNK, num_blocks=256)


def hf_greedy(hf_model, ids, n):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    new = out[0, len(ids):].tolist()
    eos = hf_model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(new):
        if t in eos:
            return new[:i + 1]
    return new


def test_greedy_matches_transformers(llm, hf_model):
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    ids = [apply_chat_template(llm.tokenizer, c) for c in convs]
    assert max(len(i) for i in ids) > CHUNK  # one prompt spans several prefill chunks
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    for conv_ids, out in zip(ids, outs, strict=True):
        assert out.prompt_token_ids == conv_ids
        expected = hf_greedy(hf_model, conv_ids, 64)
        assert out.token_ids == expected
        assert out.finish_reason == ("stop" if len(expected) < 64 else "length")
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


def test_text_prompt_and_token_prompt_agree(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    by_text = llm.generate("The quick brown fox", params, use_tqdm=False)[0]
    by_ids = llm.generate([llm.tokenizer.encode("The quick brown fox")], params,
                          use_tqdm=False)[0]
    assert by_text.token_ids == by_ids.token_ids
    assert len(by_text.token_ids) == 12 and by_text.finish_reason == "length"
    assert by_text.text == llm.tokenizer.decode(by_text.token_ids, skip_special_tokens=True)
