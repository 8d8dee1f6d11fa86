"""The batched sampler (the GPU path), run on CPU tensors, against the row-wise one."""

import torch

from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams


def _expected_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The row-wise path's distribution for one row (its transforms, no draw)."""
    row = logits / p.temperature
    if p.top_k:
        kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (probs.cumsum(-1) - probs) > p.top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.softmax(row, dim=-1)


def test_greedy_and_top_k_one_are_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0)] * 3 + [SamplingParams(top_k=1)] * 3
    out = Sampler(0, batched=True).sample(logits, [f"r{i}" for i in range(6)], params)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_batched_draws_follow_the_rowwise_distribution():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 12, generator=gen) * 2
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.2, top_k=4),
              SamplingParams(temperature=1.0, top_k=8, top_p=0.6)]
    sampler = Sampler(5, batched=True)
    draws = 4000
    counts = torch.zeros(3, 12)
    batch = logits.repeat(draws // 4, 1)  # 4 rounds of 1000 copies of the three rows
    for _ in range(4):
        out = sampler.sample(batch, [str(i) for i in range(batch.shape[0])],
                             params * (draws // 4))
        toks = torch.tensor(out.token_ids).view(-1, 3)
        for r in range(3):
            counts[r] += torch.bincount(toks[:, r], minlength=12)
    for r, p in enumerate(params):
        want = _expected_probs(logits[r], p)
        got = counts[r] / draws
        assert (got[want == 0] == 0).all()  # masked tokens are never drawn
        assert (got - want).abs().max() < 0.04, (r, got, want)


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=77)
    other = SamplingParams(temperature=1.0)

    def run(rows, params, ids):
        s = Sampler(0, batched=True)
        return [s.sample(logits[rows], ids, params).token_ids for _ in range(5)]

    alone = run([1], [seeded], ["a"])
    mixed = run([0, 1, 2], [other, seeded, other], ["x", "a", "y"])
    assert [t[0] for t in alone] == [t[1] for t in mixed]


def test_logprobs_match_the_rowwise_path():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logprobs=0)]
    ids = ["a", "b", "c"]
    fast = Sampler(0, batched=True).sample(logits, ids, params)
    slow = Sampler(0, batched=False).sample(logits, ids, params)
    assert fast.token_ids == slow.token_ids
    assert fast.logprobs[1] is None
    for f, s in zip(fast.logprobs, slow.logprobs, strict=True):
        if s is None:
            continue
        assert f.token_id == s.token_id and abs(f.logprob - s.logprob) < 1e-5
        assert [t for t, _ in f.top] == [t for t, _ in s.top]
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(f.top, s.top, strict=True))
