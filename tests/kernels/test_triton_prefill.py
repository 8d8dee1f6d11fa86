"""Triton paged prefill attention against ``reference.paged_prefill_attention``.

CPU: Triton's interpreter at small sizes (conftest sets it up), with tiles
small enough that sequences span several query and key tiles. GPU: real
sizes, bf16 included.
"""

import random

import pytest
import torch

from pdserve.kernels import reference

pytest.importorskip("triton")
from kernel_checks import INTERPRET, TOLERANCE, gpu, interpreter, rel_err  # noqa: E402,F401

from pdserve.kernels.triton_prefill import PrefillTuning, paged_prefill_attention  # noqa: E402


def check_prefill(paged_cache, q_lens, prefix_lens, hq, hkv, d, bs, dtype, device, tuning=None):
    ctx_lens = [q + p for q, p in zip(q_lens, prefix_lens, strict=True)]
    k, v, k_bad, v_bad, tables = paged_cache(ctx_lens, hkv, d, bs, dtype, device)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    qsl = torch.tensor(starts, dtype=torch.int32, device=device)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    query = torch.randn(starts[-1], hq, d, dtype=dtype, device=device)
    scale = d ** -0.5
    ref = reference.paged_prefill_attention(query.float(), k.float(), v.float(), tables, qsl, ctx,
                                            scale)
    out = torch.full_like(query, float("nan"))
    got = paged_prefill_attention(query, k_bad, v_bad, tables, qsl, ctx, scale, out=out,
                                  tuning=tuning)
    assert got is out
    err = rel_err(got, ref)
    assert err < TOLERANCE[dtype], f"rel err {err:.2e} q_lens={q_lens} prefix={prefix_lens}"


def ragged_batch(bs: int, max_q: int, max_prefix: int):
    """Fresh random (q_lens, prefix_lens): one new token, one empty sequence, odd lengths."""
    q_lens = [1, 0, random.randint(2, max_q), bs * random.randint(1, 3) + random.randint(1, bs - 1)]
    prefix = [random.randint(0, max_prefix), random.randint(1, max_prefix), 0,
              random.randint(0, max_prefix)]
    order = list(range(4))
    random.shuffle(order)
    return [q_lens[i] for i in order], [prefix[i] for i in order]


HEADS = [(4, 2, 64, 16), (2, 2, 128, 32), (6, 2, 64, 16)]  # (Hq, Hkv, D, block size)
TILES = [PrefillTuning(16, 16, 4, 1), PrefillTuning(32, 16, 4, 1), None]  # None: the default


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("hq,hkv,d,bs", HEADS)
@pytest.mark.parametrize("tuning", TILES, ids=["m16n16", "m32n16", "default"])
def test_prefill_interpreter(paged_cache, dtype, hq, hkv, d, bs, tuning):
    q_lens, prefix = ragged_batch(bs, 50, 60)
    check_prefill(paged_cache, q_lens, prefix, hq, hkv, d, bs, dtype, "cpu", tuning)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d,bs", [(128, 16), (64, 32), (128, 32)])
def test_prefill_gpu(paged_cache, dtype, d, bs):
    q_lens, prefix = ragged_batch(bs, 1500, 2000)
    check_prefill(paged_cache, q_lens, prefix, 32, 8, d, bs, dtype, "cuda")
    check_prefill(paged_cache, [2048], [2048 + random.randint(1, 15)], 32, 8, d, bs, dtype, "cuda")
