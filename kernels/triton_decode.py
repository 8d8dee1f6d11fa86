"""Paged decode attention in Triton, split-K ("flash-decoding").

One query token per sequence attends to its ``context_lens[i]`` cached tokens
through its block table (contract: ``reference.paged_decode_attention``).

The context is cut into partitions of ``partition_size`` tokens. One program
handles one (kv head, partition, sequence): the ``G`` query heads of that kv
head are the rows of one ``tl.dot`` (GQA packed, padded to 16 rows). Over more
than one partition each program writes a partial (running max, running sum,
unnormalised output) and takes a ticket from a per-(sequence, kv head) counter;
the last to draw one merges the partials (``fused_reduce``), or a second kernel does.

    sequence i:  |-- part 0 --|-- part 1 --|-- part 2 --|  ...  | part P-1 |
                  0                          ctx_i
                  programs with p * partition_size >= ctx_i exit at once;
                  the others write partials, the last to finish merges them

For a few sequences the partition size follows each context on the device
(``DecodeTuning.max_partitions``). No host syncs: the grid comes from shapes only
(``block_tables.shape[1]`` bounds every context), so a launch captures in a CUDA graph.
Split-K scratch lives in a ``DecodeWorkspace`` (partials, and ticket counters that
every launch leaves zero), allocated per batch shape or per call.
"""

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.kernels.pdl import pdl_enter, use_pdl

_LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class DecodeTuning:
    """Launch shape: tokens per partition and per loop step, warps, pipeline depth,
    and whether the last program of a sequence merges its partials (one launch)."""

    partition_size: int
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    fused_reduce: bool = True
    # > 0: partitions follow each context: at most max_partitions (unless partition_size,
    # the cap, binds), multiples of block_n, at least min_partition tokens
    max_partitions: int = 0
    min_partition: int = 64


FULL_BATCH_PARTITION = 4096  # tokens per partition when sequences x kv heads fill the GPU
SMALL_BATCH_ROWS = 32  # sequences x kv heads up to which partitions follow the context
FOLLOW_PROGRAMS = 128  # programs a context-following launch aims at
TWO_WARP_TOKENS = 512  # the most tokens a program may stream for a 2-warp launch


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: keep grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=256)
def default_tuning(num_seqs: int, num_kv_heads: int, max_blocks: int, block_size: int,
                   device: torch.device) -> DecodeTuning:
    """Partitions so that ``num_seqs * num_kv_heads * partitions`` fills the GPU.

    A function of shapes only, so one batch shape always gets one launch
    (needed for CUDA graphs).
    """
    max_tokens = max_blocks * block_size
    if device.type == "cuda" and num_seqs * num_kv_heads >= 3 * _num_sms(device):
        # A full batch fills the GPU unsplit: partitions up to 4096 tokens, 2 stages (H200,
        # B=64 x 4096: one partition 256 us = 1.0x SDPA; a cap so that a ragged batch's
        # longest do not run alone at the end: B=64 to 8192, 336 us unsplit, 2048 281).
        size = min(max_tokens, FULL_BATCH_PARTITION)
        if size >= max_tokens:
            size = -(-max_tokens // 64) * 64
        return DecodeTuning(partition_size=size, block_n=64, num_stages=2)
    if device.type == "cuda" and num_seqs * num_kv_heads <= SMALL_BATCH_ROWS:
        return small_batch_tuning(num_seqs * num_kv_heads, max_tokens)
    programs_wanted = 4 * _num_sms(device)
    parts_wanted = max(1, -(-programs_wanted // max(1, num_seqs * num_kv_heads)))
    size = triton.next_power_of_2(max(1, -(-max_tokens // parts_wanted)))
    # Floor: enough work per program (H200, B=1 x 4096: 256 tokens 20 us, 128: 25 us);
    # cap: a ragged batch's long sequences do not run alone at the end (B=32: 2048 ->
    # 191 us, one partition 243 us).
    size = min(max(size, 256 if device.type == "cuda" else 64), 2048)
    block_n = 64
    if size >= max_tokens:
        size = -(-max_tokens // block_n) * block_n  # one partition
    return DecodeTuning(partition_size=size, block_n=block_n)


def small_batch_tuning(rows: int, max_tokens: int) -> DecodeTuning:
    """A few sequences (``rows`` = sequences x KV heads): partitions follow each context,
    ~``FOLLOW_PROGRAMS`` programs; 2 warps where no program streams over
    ``TWO_WARP_TOKENS`` (table width / partitions). H200, B=1, 32-launch chain
    (results/decode_chain_h200_sweep_*): following beat fixed 256-token partitions
    (1024 tokens 7.6 vs 10.0 us, 16384 25.8 vs 38.5); 2 warps, 8192-wide tables: 5.9 /
    6.7 / 11.1 us at 256 / 1024 / 4096 tokens vs 6.7 / 7.6 / 11.6 with 4, but 27.2 vs
    25.8 at 16384 (1024 a program). Pure."""
    parts = -(-FOLLOW_PROGRAMS // rows)
    warps = 2 if max_tokens <= parts * TWO_WARP_TOKENS else 4
    return DecodeTuning(partition_size=2048, block_n=64, num_warps=warps,
                        max_partitions=parts, min_partition=64)


def num_partitions(max_blocks: int, block_size: int, tuning: DecodeTuning) -> int:
    """Partitions per (sequence, kv head) in the grid: enough for any context up to the
    table width (``_partition_size`` never makes more). Pure."""
    max_tokens = max_blocks * block_size
    capped = triton.cdiv(max_tokens, tuning.partition_size)
    if tuning.max_partitions <= 0:
        return capped
    return max(1, min(max(tuning.max_partitions, capped),
                      triton.cdiv(max_tokens, tuning.min_partition)))


@dataclass(frozen=True)
class DecodeWorkspace:
    """Scratch for split-K; allocate once per batch shape and reuse (one stream at a time).

    ``tickets`` must be zero before the first launch; every launch leaves it zero.
    """

    partials: torch.Tensor  # fp32 [>= num_seqs * num_q_heads * num_parts * (head_dim + 2)]
    tickets: torch.Tensor  # int32 [>= num_seqs * num_kv_heads]

    @classmethod
    def allocate(cls, num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 num_parts: int, device: torch.device | str) -> "DecodeWorkspace":
        numel = num_seqs * num_q_heads * num_parts * (head_dim + 2)
        return cls(torch.empty(numel, dtype=torch.float32, device=device),
                   torch.zeros(num_seqs * num_kv_heads, dtype=torch.int32, device=device))


@triton.jit
def _partition_size(ctx, partition_size, max_parts, min_part, BLOCK_N: tl.constexpr,
                    ADAPTIVE: tl.constexpr):
    """Tokens per partition for ``ctx``: fixed, or (``ADAPTIVE``) ``ctx / max_parts``
    rounded up to ``BLOCK_N``, within ``[min_part, partition_size]``."""
    if ADAPTIVE:
        size = tl.cdiv(tl.cdiv(ctx, max_parts), BLOCK_N) * BLOCK_N
        return tl.minimum(tl.maximum(size, min_part), partition_size)
    else:
        return partition_size + 0 * ctx


@triton.jit
def _merge_partials(out_ptr, m_ptr, l_ptr, acc_ptr, first, num_valid, seq, kv_head,
                    stride_on, stride_oh,
                    GROUP: tl.constexpr, BLOCK_GR: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Merge partials ``first .. first + num_valid`` of one (sequence, kv head).

    Partial (p, g) sits at row ``(first + p) * GROUP + g`` of m / l / acc.
    One pass: m, l and acc of ``BLOCK_P`` partials are loaded together and folded
    into a running max / denominator / output (online softmax), so when all
    partials fit one chunk (the usual case) the merge is one round of loads.
    """
    offs_p = tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, BLOCK_GR)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM

    m_run = tl.full([BLOCK_GR], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_GR, BLOCK_D], tl.float32)
    denom = tl.zeros([BLOCK_GR], tl.float32)
    for p0 in range(0, num_valid, BLOCK_P):
        pg_mask = ((p0 + offs_p) < num_valid)[:, None] & g_mask[None, :]
        rows = (first + p0 + offs_p)[:, None] * GROUP + offs_g[None, :]  # [BLOCK_P, BLOCK_GR]
        m = tl.load(m_ptr + rows, mask=pg_mask, other=float("-inf"), cache_modifier=".cg")
        lsum = tl.load(l_ptr + rows, mask=pg_mask, other=0.0, cache_modifier=".cg")
        a = tl.load(acc_ptr + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=pg_mask[:, :, None] & d_mask[None, None, :], other=0.0,
                    cache_modifier=".cg")  # [BLOCK_P, BLOCK_GR, BLOCK_D]
        m_new = tl.maximum(m_run, tl.max(m, 0))  # [BLOCK_GR]; -inf only in padded rows
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
        alpha = tl.exp2(m_run - m_ref)  # 0 on the first chunk
        w = tl.exp2(m - m_ref[None, :])  # [BLOCK_P, BLOCK_GR], 0 where masked
        acc = acc * alpha[:, None] + tl.sum(a * w[:, :, None], 0)
        denom = denom * alpha + tl.sum(w * lsum, 0)
        m_run = m_new
    o = acc / tl.where(g_mask, denom, 1.0)[:, None]
    heads = kv_head * GROUP + offs_g
    tl.store(out_ptr + seq * stride_on + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, out_ptr, ticket_ptr, ws_ptr,
    qk_scale, partition_size, max_parts, min_part, max_blocks,
    stride_qn, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_tn, stride_on, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GR: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    SPLIT: tl.constexpr, FUSED_REDUCE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr, ADAPTIVE: tl.constexpr = False,
):
    kv_head = tl.program_id(0)
    part = tl.program_id(1)
    seq = tl.program_id(2)
    num_kv_heads = tl.num_programs(0)
    num_parts = tl.num_programs(1)

    # The length and first block ids (step inputs, not written by the kernel ahead)
    # load before the length check and, under PDL, before the wait, so a partition past
    # its context exits without waiting; q (written by the kernel ahead) loads after
    # it. The first ids are masked by the table width: entries past a context may be
    # any id, used only under the K/V masks below, which use the context.
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    gd_mask = g_mask[:, None] & d_mask[None, :]
    heads = kv_head * GROUP + offs_g  # [BLOCK_G] query heads of this kv head
    table = tables_ptr + seq.to(tl.int64) * stride_tn
    ctx = tl.load(ctx_ptr + seq)
    if ADAPTIVE:  # the partition follows the context: its ids wait for the length
        partition_size = _partition_size(ctx, partition_size, max_parts, min_part, BLOCK_N,
                                         ADAPTIVE)
    start = part * partition_size
    toks = start + offs_n  # [BLOCK_N]
    blk = tl.load(table + toks // KV_BLOCK, mask=(toks // KV_BLOCK) < max_blocks,
                  other=0).to(tl.int64)
    q_ptrs = q_ptr + seq * stride_qn + heads[:, None] * stride_qh + offs_d[None, :]
    if not PDL:  # nothing to wait for: q joins the length's round trip
        q = tl.load(q_ptrs, mask=gd_mask, other=0.0)
    if start >= ctx:
        return
    pdl_enter(PDL)
    if PDL:
        q = tl.load(q_ptrs, mask=gd_mask, other=0.0)
    end = tl.minimum(start + partition_size, ctx)
    q = q.to(k_ptr.dtype.element_ty)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # The block ids of the next tile are loaded beside this tile's K and V, so a tile
    # costs one memory round trip, not two (block id, then the KV it names).
    for _ in range(start, end, BLOCK_N):
        t_mask = toks < end
        kv_off = (blk * stride_kb + (toks % KV_BLOCK) * stride_kt + kv_head * stride_kh)[:, None] \
            + offs_d[None, :]  # [BLOCK_N, BLOCK_D]; V has K's strides
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        toks_next = toks + BLOCK_N
        blk = tl.load(table + toks_next // KV_BLOCK, mask=toks_next < end, other=0).to(tl.int64)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        toks = toks_next

    if SPLIT:
        num_valid = tl.minimum(tl.cdiv(ctx, partition_size), num_parts)  # programs that ran
        if FUSED_REDUCE:
            finish_here = num_valid == 1
        else:
            finish_here = num_valid < 0  # never: the merge kernel writes every output
        if finish_here:
            o = acc / l_i[:, None]
            tl.store(out_ptr + seq * stride_on + heads[:, None] * stride_oh + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=gd_mask)
        else:
            # workspace: m [num_partials] | l [num_partials] | acc [num_partials, HEAD_DIM]
            num_partials = tl.num_programs(2) * num_kv_heads * num_parts * GROUP
            m_ptr = ws_ptr
            l_ptr = ws_ptr + num_partials
            acc_ptr = ws_ptr + 2 * num_partials
            first = (seq * num_kv_heads + kv_head) * num_parts
            rows = (first + part) * GROUP + offs_g  # [BLOCK_G]
            tl.store(m_ptr + rows, m_i, mask=g_mask)
            tl.store(l_ptr + rows, l_i, mask=g_mask)
            tl.store(acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gd_mask)
            if FUSED_REDUCE:
                # Every thread's partial stores precede the release of the ticket.
                tl.debug_barrier()
                counter = ticket_ptr + seq * num_kv_heads + kv_head
                ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
                if ticket == num_valid - 1:  # last one in: all partials are visible
                    _merge_partials(out_ptr, m_ptr, l_ptr, acc_ptr, first, num_valid, seq,
                                    kv_head, stride_on, stride_oh, GROUP, BLOCK_GR, HEAD_DIM,
                                    BLOCK_D, BLOCK_P)
                    tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # for the next launch
    else:
        o = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_on + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=gd_mask)


@triton.jit
def _decode_merge_kernel(
    out_ptr, ws_ptr, ctx_ptr, partition_size, max_parts, min_part, num_parts, stride_on,
    stride_oh,
    GROUP: tl.constexpr, BLOCK_GR: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, ADAPTIVE: tl.constexpr,
):
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq)
    size = _partition_size(ctx, partition_size, max_parts, min_part, BLOCK_N, ADAPTIVE)
    num_valid = tl.minimum(tl.cdiv(ctx, size), num_parts)
    first = (seq * tl.num_programs(0) + kv_head) * num_parts
    num_partials = tl.num_programs(1) * tl.num_programs(0) * num_parts * GROUP
    m_ptr = ws_ptr
    l_ptr = ws_ptr + num_partials
    acc_ptr = ws_ptr + 2 * num_partials
    _merge_partials(out_ptr, m_ptr, l_ptr, acc_ptr, first, num_valid, seq, kv_head,
                    stride_on, stride_oh, GROUP, BLOCK_GR, HEAD_DIM, BLOCK_D, BLOCK_P)


def paged_decode_attention(
    query: torch.Tensor,  # [N, Hq, D]
    k_cache: torch.Tensor,  # [NB, B, Hkv, D]
    v_cache: torch.Tensor,  # [NB, B, Hkv, D], same strides as k_cache
    block_tables: torch.Tensor,  # [N, max_blocks] int32
    context_lens: torch.Tensor,  # [N] int32, >= 1
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [N, Hq, D] (written if given)
    workspace: DecodeWorkspace | None = None,
    tuning: DecodeTuning | None = None,
) -> torch.Tensor:  # [N, Hq, D]
    """See ``reference.paged_decode_attention``. Pure but for ``out``/``workspace``.

    No host sync; the returned tensor is ready when the launching stream is. Under PDL
    (``pdl.use_pdl``) ``block_tables`` and ``context_lens`` are read before the kernel
    ahead on the stream has finished: they must not be written by that kernel (a
    step's inputs copied in before its first kernel are fine; torch's kernels and
    copies, launched without PDL, always finish first).
    """
    n, hq, d = query.shape
    _, bs, hkv, _ = k_cache.shape
    assert hq % hkv == 0, "query heads must be a multiple of kv heads"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if query.stride(-1) != 1:
        query = query.contiguous()
    group = hq // hkv
    if out is None:
        out = torch.empty_like(query)
    if n == 0:
        return out
    max_blocks = block_tables.shape[1]
    if tuning is None:
        tuning = default_tuning(n, hkv, max_blocks, bs, query.device)
    num_parts = num_partitions(max_blocks, bs, tuning)
    split = num_parts > 1
    if split:
        if workspace is None:
            workspace = DecodeWorkspace.allocate(n, hq, hkv, d, num_parts, query.device)
        assert workspace.partials.numel() >= n * hq * num_parts * (d + 2), "workspace too small"
        assert workspace.tickets.numel() >= n * hkv, "workspace too small"
        tickets, partials = workspace.tickets, workspace.partials
    else:
        tickets = partials = out  # unused
    block_d = triton.next_power_of_2(d)
    block_gr = triton.next_power_of_2(group)
    block_p = max(1, min(triton.next_power_of_2(num_parts), 8192 // (block_gr * block_d)))
    _decode_kernel[(hkv, num_parts, n)](
        query, k_cache, v_cache, block_tables, context_lens, out, tickets, partials,
        scale * _LOG2E, tuning.partition_size, max(1, tuning.max_partitions),
        tuning.min_partition, max_blocks,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, block_gr), BLOCK_GR=block_gr, HEAD_DIM=d, BLOCK_D=block_d,
        KV_BLOCK=bs, BLOCK_N=tuning.block_n, BLOCK_P=block_p, SPLIT=split,
        FUSED_REDUCE=tuning.fused_reduce,
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
        PDL=use_pdl(query), launch_pdl=use_pdl(query), ADAPTIVE=tuning.max_partitions > 0,
    )
    if split and not tuning.fused_reduce:
        _decode_merge_kernel[(hkv, n)](
            out, partials, context_lens, tuning.partition_size, max(1, tuning.max_partitions),
            tuning.min_partition, num_parts, out.stride(0), out.stride(1),
            GROUP=group, BLOCK_GR=block_gr, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_P=block_p,
            BLOCK_N=tuning.block_n, ADAPTIVE=tuning.max_partitions > 0, num_warps=4,
        )
    return out


__all__ = ["DecodeTuning", "DecodeWorkspace", "default_tuning", "num_partitions",
           "paged_decode_attention"]
