"""Triton paged decode attention against ``reference.paged_decode_attention``.

CPU: Triton's interpreter at small sizes (conftest sets it up). GPU: real
sizes, bf16 included, and a CUDA-graph capture (which fails on a host sync).
"""

import random

import pytest
import torch

from pdserve.kernels import reference

triton = pytest.importorskip("triton")
from kernel_checks import INTERPRET, TOLERANCE, gpu, interpreter, rel_err  # noqa: E402,F401

from pdserve.kernels.triton_decode import (  # noqa: E402
    DecodeTuning,
    DecodeWorkspace,
    default_tuning,
    num_partitions,
    paged_decode_attention,
)


def ragged_lens(num_seqs: int, block_size: int, max_len: int) -> list[int]:
    """Fresh random lengths with a 1 and a length that is not a multiple of the block size."""
    odd = block_size * random.randint(1, max(1, max_len // block_size - 1)) + random.randint(
        1, block_size - 1)
    lens = [1, min(odd, max_len)] + [random.randint(1, max_len) for _ in range(num_seqs - 2)]
    random.shuffle(lens)
    return lens


def check_decode(paged_cache, lens, hq, hkv, d, bs, dtype, device, tuning=None):
    k, v, k_bad, v_bad, tables = paged_cache(lens, hkv, d, bs, dtype, device)
    query = torch.randn(len(lens), hq, d, dtype=dtype, device=device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = d ** -0.5
    ref = reference.paged_decode_attention(query.float(), k.float(), v.float(), tables, ctx, scale)
    out = torch.full_like(query, float("nan"))
    plan = tuning or default_tuning(len(lens), hkv, tables.shape[1], bs, query.device)
    parts = num_partitions(tables.shape[1], bs, plan)
    ws = DecodeWorkspace.allocate(len(lens), hq, hkv, d, parts, device)
    ws.partials.fill_(float("nan"))
    for _ in range(2 if parts > 1 else 1):  # a second launch reuses the tickets left behind
        got = paged_decode_attention(query, k_bad, v_bad, tables, ctx, scale, out=out,
                                     workspace=ws, tuning=tuning)
        assert got is out
        err = rel_err(got, ref)
        assert err < TOLERANCE[dtype], f"rel err {err:.2e} lens={lens}"
        assert not ws.tickets.any(), "tickets must be left zero"
        out.fill_(float("nan"))


HEADS = [(8, 2, 64, 16), (2, 2, 128, 32), (6, 2, 64, 32)]  # (Hq, Hkv, D, block size)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("hq,hkv,d,bs", HEADS)
@pytest.mark.parametrize("mode", ["fused", "merge_kernel", "whole"])
def test_decode_interpreter(paged_cache, dtype, hq, hkv, d, bs, mode):
    lens = ragged_lens(4, bs, 120)
    # partitions of 32 tokens, 16 per step, merged by the last program or by a second
    # kernel; or one partition for the whole context
    tuning = {"fused": DecodeTuning(32, 16),
              "merge_kernel": DecodeTuning(32, 16, fused_reduce=False),
              "whole": DecodeTuning(1024, 32)}[mode]
    check_decode(paged_cache, lens, hq, hkv, d, bs, dtype, "cpu", tuning)


@interpreter
def test_decode_interpreter_many_partitions(paged_cache):
    """More partials (25+) than one merge step holds (16 here), with a group of 4."""
    lens = [random.randint(400, 500), 1, random.randint(2, 40)]
    check_decode(paged_cache, lens, 4, 1, 128, 16, torch.float32, "cpu", DecodeTuning(16, 16))


def scaled_keys(paged_cache, partition_size, factors):
    """``paged_cache``, but the keys of partition j of every sequence scaled by ``factors[j]``
    (so each partition's scores, and its partial's running max, live on its own scale)."""

    def make(context_lens, num_kv_heads, head_dim, block_size, dtype, device="cpu"):
        k, v, k_bad, v_bad, tables = paged_cache(context_lens, num_kv_heads, head_dim,
                                                 block_size, dtype, device)
        for i, ctx in enumerate(context_lens):
            pos = torch.arange(ctx)
            blocks = tables[i, pos // block_size].long()
            f = torch.tensor(factors, dtype=dtype)[pos // partition_size][:, None, None]
            for cache in (k, k_bad):
                cache[blocks, pos % block_size] *= f
        return k, v, k_bad, v_bad, tables

    return make


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["fused", "merge_kernel"])
def test_decode_interpreter_one_pass_merge(paged_cache, dtype, mode):
    """Many partials (9-13 per sequence) merged in chunks of 8 (group 8, head dim 128),
    each partition's scores on a very different scale: the partial holding the
    largest max sits in the first chunk for one sequence, the last chunk for
    another, and in between for a third, so the running max and the rescaling of
    the running output and denominator all matter. Lengths not a multiple of the
    block size, and a one-token sequence (one partial)."""
    part = 16
    rising = [0.05 * 1.6 ** j for j in range(13)]  # largest scores in the last partition
    factors = [rising[j] if j % 2 else rising[-1 - j] for j in range(13)]  # and mixed
    lens = [13 * part - 5, 9 * part + 3, 1, 11 * part]
    for facs in (rising, rising[::-1], factors):
        tuning = DecodeTuning(part, 16, fused_reduce=mode == "fused")
        check_decode(scaled_keys(paged_cache, part, facs), lens, 8, 1, 128, 16, dtype, "cpu",
                     tuning)


@interpreter
@pytest.mark.parametrize("mode", ["fused", "merge_kernel"])
def test_decode_interpreter_partitions_follow_the_context(paged_cache, mode):
    """Partitions sized per sequence on the device: at most 3, multiples of 16 tokens,
    at least 32, at most 64 (the cap makes a 190-token context take 3, a 40-token one
    takes 2 of 32, a 1-token one 1); the grid (3 here, 4 with the cap alone) is what
    ``num_partitions`` says."""
    tuning = DecodeTuning(64, 16, fused_reduce=mode == "fused", max_partitions=3,
                          min_partition=32)
    assert num_partitions(12, 16, tuning) == 3  # 192 tokens: cap 64 -> 3
    assert num_partitions(16, 16, tuning) == 4  # 256 tokens: the cap binds -> 4
    assert num_partitions(2, 16, tuning) == 1  # 32 tokens: one partition of 32
    lens = [190, 40, 1, random.randint(2, 190)]
    check_decode(paged_cache, lens, 8, 2, 64, 16, torch.float32, "cpu", tuning)
    check_decode(paged_cache, [250, 17], 4, 1, 64, 16, torch.float16, "cpu", tuning)


@interpreter
def test_decode_interpreter_default_tuning(paged_cache):
    check_decode(paged_cache, ragged_lens(3, 16, 300), 4, 2, 64, 16, torch.float16, "cpu")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d,bs", [(128, 16), (64, 32), (128, 32)])
def test_decode_gpu(paged_cache, dtype, d, bs):
    lens = ragged_lens(16, bs, 4096)
    check_decode(paged_cache, lens, 32, 8, d, bs, dtype, "cuda")
    check_decode(paged_cache, lens, 32, 8, d, bs, dtype, "cuda", DecodeTuning(128, 64))
    check_decode(paged_cache, lens, 32, 8, d, bs, dtype, "cuda",
                 DecodeTuning(256, 64, fused_reduce=False))
    check_decode(paged_cache, [random.randint(20000, 33000)], 32, 8, d, bs, dtype, "cuda")
    check_decode(paged_cache, lens, 32, 8, d, bs, dtype, "cuda",
                 DecodeTuning(2048, 64, max_partitions=16, min_partition=64))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("partition_size", [128, 4096])  # split-K, and one partition
def test_decode_gpu_cuda_graph(paged_cache, partition_size):
    """Capture fails on any host sync; replays must follow new context lengths."""
    lens = ragged_lens(8, 16, 2048)
    k, v, _, _, tables = paged_cache(lens, 8, 128, 16, torch.bfloat16, "cuda")
    query = torch.randn(8, 32, 128, dtype=torch.bfloat16, device="cuda")
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    tuning = DecodeTuning(partition_size)
    ws = DecodeWorkspace.allocate(8, 32, 8, 128, num_partitions(tables.shape[1], 16, tuning),
                                  "cuda")
    run = lambda: paged_decode_attention(query, k, v, tables, ctx, 0.1, out=out, workspace=ws,
                                         tuning=tuning)
    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for shrink in (7, 0):
        ctx.copy_(torch.tensor([max(1, n - shrink) for n in lens], dtype=torch.int32))
        query.copy_(torch.randn_like(query))
        out.fill_(float("nan"))
        graph.replay()
        ref = reference.paged_decode_attention(query.float(), k.float(), v.float(), tables, ctx,
                                               0.1)
        assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
    assert not ws.tickets.any()


def test_small_batch_tuning_two_warps_only_for_short_programs():
    """About 128 programs; 2 warps while no program can stream more than 512 tokens."""
    from pdserve.kernels.triton_decode import small_batch_tuning

    b1 = small_batch_tuning(8, 8192)  # batch 1, 8 KV heads, max_model_len 8192
    assert (b1.max_partitions, b1.num_warps, b1.min_partition, b1.block_n) == (16, 2, 64, 64)
    assert small_batch_tuning(8, 16384).num_warps == 4  # up to 1024 tokens a program
    b2 = small_batch_tuning(16, 8192)
    assert (b2.max_partitions, b2.num_warps) == (8, 4)
    assert (small_batch_tuning(16, 4096).max_partitions,
            small_batch_tuning(16, 4096).num_warps) == (8, 2)
    assert small_batch_tuning(32, 2048).max_partitions == 4
