"""``reference.paged_prefill_attention`` by hand: values chosen so that every result is
exact in float32 (zero keys give uniform attention over 1, 2 or 4 visible tokens;
a score 100 above the rest picks one key alone)."""

import torch
from kernel_checks import TOY_BS as BS
from kernel_checks import TOY_D as D
from kernel_checks import TOY_HKV as HKV
from kernel_checks import TOY_HQ as HQ
from kernel_checks import toy_caches as _caches

from pdserve.kernels.reference import paged_prefill_attention


def _put(cache, table, pos, value):
    """Token ``pos`` of the sequence with block ids ``table``, every head and dim."""
    cache[table[pos // BS], pos % BS] = value


def test_causal_uniform_attention_over_the_visible_prefix():
    k, v = _caches()
    # seq 0: blocks 4, 1, no cached prefix, 2 new tokens: they see 1 and 2 tokens
    # seq 1: block 2, 3 cached tokens + 1 new: it sees all 4
    t0, t1 = [4, 1], [2, 5]
    for p, val in enumerate([6.0, 2.0]):
        _put(v, t0, p, val + 10.0 * torch.arange(HKV)[:, None])  # KV head h adds 10 * h
    for p, val in enumerate([1.0, 3.0, 5.0, 7.0]):
        _put(v, t1, p, val)
    tables = torch.tensor([t0 + [0], t1 + [0]], dtype=torch.int32)
    q_start = torch.tensor([0, 2, 3], dtype=torch.int32)
    ctx = torch.tensor([2, 4], dtype=torch.int32)
    q = torch.randn(3, HQ, D)  # any query: the keys are all zero
    out = paged_prefill_attention(q, k, v, tables, q_start, ctx, scale=0.5)
    assert out.shape == (3, HQ, D)
    # query heads 0, 1 read KV head 0; heads 2, 3 read KV head 1
    assert out[0].tolist() == [[6.0] * D, [6.0] * D, [16.0] * D, [16.0] * D]
    assert out[1].tolist() == [[4.0] * D, [4.0] * D, [14.0] * D, [14.0] * D]
    assert out[2].tolist() == [[4.0] * D] * HQ


def test_future_tokens_are_hidden():
    k, v = _caches()
    table = [3, 0]
    for p in range(4):  # key p scores 100 * p against the query: later keys score higher
        _put(k, table, p, torch.tensor([100.0 * p, 0.0, 0.0, 0.0]))
        _put(v, table, p, float(p + 1))
    q = torch.zeros(3, HQ, D)
    q[:, :, 0] = 1.0
    # 1 cached token, 3 new (positions 1, 2, 3): each sees its own key as the highest
    out = paged_prefill_attention(q, k, v, torch.tensor([table], dtype=torch.int32),
                                  torch.tensor([0, 3], dtype=torch.int32),
                                  torch.tensor([4], dtype=torch.int32), scale=1.0)
    assert out[:, :, 0].tolist() == [[2.0] * HQ, [3.0] * HQ, [4.0] * HQ]
