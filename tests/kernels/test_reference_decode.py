"""``reference.paged_decode_attention`` by hand: values chosen so that every result
is exact in float32 (zero keys give uniform attention; means of few integers)."""

import torch
from kernel_checks import TOY_BS as BS
from kernel_checks import TOY_D as D
from kernel_checks import TOY_HKV as HKV
from kernel_checks import TOY_HQ as HQ
from kernel_checks import toy_caches as _caches

from pdserve.kernels.reference import decode_gather, paged_decode_attention


def test_uniform_attention_over_blocks_of_the_table_only():
    k, v = _caches()
    # seq 0: blocks 4, 1 -> tokens 0..3 hold values 0, 2, 4, 6 (KV head h adds 10 * h)
    for i, (blk, off) in enumerate([(4, 0), (4, 1), (1, 0), (1, 1)]):
        v[blk, off] = 2.0 * i + 10.0 * torch.arange(HKV)[:, None]
    # seq 1: one token in block 2, slot 0
    v[2, 0] = torch.tensor([[7.0], [-3.0]])
    tables = torch.tensor([[4, 1, 0], [2, 5, 0]], dtype=torch.int32)
    ctx = torch.tensor([4, 1], dtype=torch.int32)
    q = torch.randn(2, HQ, D)  # any query: the keys are all zero
    out = paged_decode_attention(q, k, v, tables, ctx, scale=0.5)
    assert out.shape == (2, HQ, D)
    # query heads 0, 1 read KV head 0; heads 2, 3 read KV head 1
    assert out[0].tolist() == [[3.0] * D, [3.0] * D, [13.0] * D, [13.0] * D]
    assert out[1].tolist() == [[7.0] * D, [7.0] * D, [-3.0] * D, [-3.0] * D]


def test_scores_pick_the_matching_key():
    k, v = _caches()
    tables = torch.tensor([[3]], dtype=torch.int32)
    k[3, 0, :, 0] = 100.0  # token 0 matches a query along dim 0 ...
    k[3, 1, :, 1] = 100.0  # ... token 1 one along dim 1
    v[3, 0], v[3, 1] = 1.0, 2.0
    q = torch.zeros(1, HQ, D)
    q[0, :, 0] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    q[0, :, 1] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    out = paged_decode_attention(q, k, v, tables, torch.tensor([2], dtype=torch.int32), 1.0)
    # exp(-100) vanishes beside 1 in float32: each head reads its key's value alone
    assert out[0, :, 0].tolist() == [1.0, 2.0, 1.0, 2.0]


def test_gather_plan_cuts_to_the_longest_context():
    tables = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    plan = decode_gather(tables, torch.tensor([3, 1], dtype=torch.int32), BS)
    assert plan.num_tokens == 3 and plan.block_ids.tolist() == [4, 1, 2, 5]  # 2 blocks each
    inf = float("-inf")
    assert plan.mask.shape == (2, 1, 1, 3)
    assert plan.mask[:, 0, 0].tolist() == [[0.0, 0.0, 0.0], [0.0, inf, inf]]


def test_a_shared_gather_plan_gives_the_same_bits():
    k, v = _caches()
    gen = torch.Generator().manual_seed(3)
    k.normal_(generator=gen)
    v.normal_(generator=gen)
    tables = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    ctx = torch.tensor([3, 5], dtype=torch.int32)
    plan = decode_gather(tables, ctx, BS)
    for _ in range(2):  # one plan, two layers' calls
        q = torch.randn(2, HQ, D, generator=gen)
        assert torch.equal(paged_decode_attention(q, k, v, tables, ctx, 0.5, plan),
                           paged_decode_attention(q, k, v, tables, ctx, 0.5))
