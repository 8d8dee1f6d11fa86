"""pdserve.LLM on a GPU against transformers, on a small random-weight Llama.

Needs CUDA (``gpu`` marker). The model dir gets a word-level tokenizer
("t0" .. "t49151"), so nothing is needed from a hub or a package. The bf16 agreement
fraction is printed and, with ``$OUT`` set, written to ``$OUT/gpu_bf16_agreement.json``.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from pdserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu

NEW_TOKENS = 24
CHUNK = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(49152)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(out)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=768,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      rope_theta=500000.0, initializer_range=0.1, tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 512},
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lens = [3, 17, 40, 64, 65, 150, 9, 33, 230, 5, 100]  # some span several prefill chunks
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lens]


def _hf_greedy(model_dir, prompts):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).cuda().eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device="cuda")
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    del hf
    return outs


def _ours(model_dir, prompts, **kw):
    llm = LLM(str(model_dir), max_num_batched_tokens=CHUNK, num_blocks=512, max_num_seqs=16,
              **kw)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    graphs = llm.engine.runner.graphs is not None
    del llm
    torch.cuda.empty_cache()
    return outs, graphs


def test_float32_greedy_matches_transformers_with_and_without_graphs(model_dir):
    prompts = _prompts()
    expected = _hf_greedy(model_dir, prompts)
    graphed, used = _ours(model_dir, prompts, dtype="float32")
    assert used
    eager, used = _ours(model_dir, prompts, dtype="float32", cuda_graphs=False)
    assert not used
    assert graphed == expected
    assert eager == expected


def test_bf16_agrees_with_float32_on_first_tokens(model_dir):
    prompts = _prompts()
    f32, _ = _ours(model_dir, prompts, dtype="float32")
    bf16, _ = _ours(model_dir, prompts, dtype="bfloat16")
    first = sum(a[0] == b[0] for a, b in zip(f32, bf16, strict=True)) / len(prompts)
    first4 = sum(a[:4] == b[:4] for a, b in zip(f32, bf16, strict=True)) / len(prompts)
    report = {"prompts": len(prompts), "first_token_agreement": first,
              "first_4_tokens_agreement": first4}
    print("bf16 vs float32:", report)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_bf16_agreement.json").write_text(json.dumps(report))
    assert first >= 0.6


def test_seeded_sampling_on_gpu_is_reproducible_and_batch_independent(model_dir):
    llm = LLM(str(model_dir), num_blocks=512, max_num_seqs=16)
    prompts = _prompts()
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=12,
                       ignore_eos=True)
    alone = llm.generate([prompts[2]], p, use_tqdm=False)[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    mixed = llm.generate(prompts[:4], [other, other, p, other], use_tqdm=False)[2].token_ids
    assert alone == mixed and len(alone) == 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_references(dtype):
    from pdserve.kernels import triton_fused as F

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 4096, device="cuda", generator=g).to(dtype)
    w = torch.randn(4096, device="cuda", generator=g).to(dtype)
    r = torch.randn(37, 4096, device="cuda", generator=g).to(dtype)
    r1, r2 = r.clone(), r.clone()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(F.rms_norm(x, w, 1e-5, r1).float(),
                          F.rms_norm_reference(x, w, 1e-5, r2).float(), atol=tol, rtol=tol)
    assert torch.equal(r1, r2)
    gu = torch.randn(37, 2 * 1000, device="cuda", generator=g).to(dtype)
    assert torch.allclose(F.silu_and_mul(gu).float(), F.silu_and_mul_reference(gu).float(),
                          atol=tol, rtol=tol)
    t, hq, hkv, d = 9, 32, 8, 128
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", generator=g).to(dtype)
    ang = torch.rand(100, d // 2, device="cuda", generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    pos = torch.randint(0, 100, (t,), device="cuda", generator=g)
    slots = torch.randperm(64, device="cuda", generator=g)[:t]
    slots[3] = -1
    res = []
    for fn in (F.rope_store_kv, F.rope_store_kv_reference):
        y = qkv.clone()
        kc = torch.full((4, 16, hkv, d), float("nan"), device="cuda", dtype=dtype)
        vc = kc.clone()
        q, k, v = y.split([hq * d, hkv * d, hkv * d], -1)
        fn(q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d), pos, cos, sin, kc, vc, slots)
        res.append((y, kc, vc))
    for a, b in zip(*res, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol, equal_nan=True)


def test_lookahead_on_graphs_equals_the_synchronous_step(model_dir):
    """The one-step lookahead on the captured graphs (the token feed on the device, rows
    dropped after stop tokens) against the synchronous step: greedy, seeded, logprobs."""
    prompts = _prompts()
    kw = {"max_num_batched_tokens": CHUNK, "num_blocks": 512, "max_num_seqs": 16,
          "dtype": "float32"}
    sync = LLM(str(model_dir), async_scheduling=False, **kw)
    full = sync.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                                 ignore_eos=True), use_tqdm=False)
    params = []
    for i, f in enumerate(full):
        if i % 3 == 0:  # stops on a token of its greedy output: its next row is dropped
            params.append(SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                         stop_token_ids=[f.token_ids[3 + i % 7]]))
        else:
            params.append(SamplingParams(temperature=0.8, seed=100 + i, ignore_eos=True,
                                         max_tokens=NEW_TOKENS - i, logprobs=2 if i % 2 else None))
    want = sync.generate(prompts, params, use_tqdm=False)
    del sync
    torch.cuda.empty_cache()
    ahead = LLM(str(model_dir), **kw)
    assert ahead.engine.lookahead is not None and ahead.engine.runner.graphs is not None
    got = ahead.generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
        assert [x.token_id for x in g.outputs[0].logprobs or []] == \
            [x.token_id for x in w.outputs[0].logprobs or []]
        for x, y in zip(g.outputs[0].logprobs or [], w.outputs[0].logprobs or [], strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
    assert [o.finish_reason for o in got][::3] == ["stop"] * len(got[::3])
    assert ahead.engine.pool.num_free_blocks == 512 and not ahead.engine.has_unfinished()
