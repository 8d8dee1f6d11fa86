"""Paged decode attention in Triton, split-K ("flash-decoding").

One query token per sequence attends to its ``context_lens[i]`` cached tokens
through its block table (contract: ``reference.paged_decode_attention``).

The context is cut into partitions of ``partition_size`` tokens. One program
of the first kernel handles one (kv head, partition, sequence): all ``G``
query heads of that kv head are the rows of one ``tl.dot`` (GQA packed, padded
to 16 rows), and it writes a partial result (running max, running sum,
unnormalised output). The second kernel merges a sequence's partials. When a
single partition covers the longest possible context, the first kernel
writes the normalised output directly and the second is not launched.

    sequence i:  |-- part 0 --|-- part 1 --|-- part 2 --|  ...  | part P-1 |
                  0            ctx_i                                  <- programs
                  p * partition_size >= ctx_i: the program exits at once and the
                  reduce reads only the first cdiv(ctx_i, partition_size) partials

No host syncs: the grid comes from tensor shapes only (``block_tables.shape[1]``
bounds every context), so a launch can be captured in a CUDA graph. The
partials live in a workspace (fp32, ``workspace_numel`` elements) that the
caller may preallocate once; nothing in it needs initialising.
"""

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class DecodeTuning:
    """Launch shape: tokens per partition, tokens per loop step, warps, pipeline depth."""

    partition_size: int
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: keep grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_tuning(num_seqs: int, num_kv_heads: int, max_blocks: int, block_size: int,
                   device: torch.device) -> DecodeTuning:
    """Pick partitions so that ``num_seqs * num_kv_heads * partitions`` fills the GPU.

    A function of shapes only, so the same batch shape always gets the same
    launch (needed for CUDA graphs).
    """
    block_n = 64
    max_tokens = max_blocks * block_size
    programs_wanted = 4 * _num_sms(device)
    parts_wanted = max(1, -(-programs_wanted // max(1, num_seqs * num_kv_heads)))
    size = triton.next_power_of_2(max(1, -(-max_tokens // parts_wanted)))
    size = max(size, 256 if device.type == "cuda" else block_n)
    size = min(size, triton.next_power_of_2(max(max_tokens, block_n)))
    return DecodeTuning(partition_size=max(size, block_n), block_n=block_n)


def workspace_numel(num_seqs: int, num_q_heads: int, head_dim: int, num_parts: int) -> int:
    """fp32 elements of the split-K workspace: max, sum and output per partial."""
    return num_seqs * num_q_heads * num_parts * (head_dim + 2)


@triton.jit
def _decode_partition_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    qk_scale, partition_size,
    stride_qn, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tn, stride_on, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(0)
    part = tl.program_id(1)
    seq = tl.program_id(2)
    num_parts = tl.num_programs(1)
    ctx = tl.load(ctx_ptr + seq)
    start = part * partition_size
    if start >= ctx:
        return
    end = tl.minimum(start + partition_size, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g  # [BLOCK_G] query heads of this kv head
    q = tl.load(q_ptr + seq * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_tn
    for kv0 in range(start, end, BLOCK_N):
        toks = kv0 + offs_n  # [BLOCK_N]
        t_mask = toks < end
        blk = tl.load(table + toks // KV_BLOCK, mask=t_mask, other=0).to(tl.int64)
        row = toks % KV_BLOCK
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + (blk * stride_kb + row * stride_kt + kv_head * stride_kh)[:, None]
                    + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (blk * stride_vb + row * stride_vt + kv_head * stride_vh)[:, None]
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLIT:
        num_heads = tl.num_programs(0) * GROUP
        partial = (seq * num_heads + heads) * num_parts + part  # [BLOCK_G]
        tl.store(m_ptr + partial, m_i, mask=g_mask)
        tl.store(l_ptr + partial, l_i, mask=g_mask)
        tl.store(acc_ptr + partial[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=g_mask[:, None] & d_mask[None, :])
    else:
        o = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_on + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
    out_ptr, m_ptr, l_ptr, acc_ptr, ctx_ptr, partition_size, num_parts,
    stride_on, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    head = tl.program_id(0)
    seq = tl.program_id(1)
    num_heads = tl.num_programs(0)
    ctx = tl.load(ctx_ptr + seq)
    num_valid = tl.cdiv(ctx, partition_size)  # partials written for this sequence
    first = (seq * num_heads + head) * num_parts
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for p0 in range(0, num_valid, BLOCK_P):
        p_mask = p0 + offs_p < num_valid
        m = tl.load(m_ptr + first + p0 + offs_p, mask=p_mask, other=float("-inf"))
        m_run = tl.maximum(m_run, m)
    m_max = tl.max(m_run, 0)

    acc = tl.zeros([BLOCK_D], tl.float32)
    denom = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, num_valid, BLOCK_P):
        p_mask = p0 + offs_p < num_valid
        m = tl.load(m_ptr + first + p0 + offs_p, mask=p_mask, other=float("-inf"))
        lsum = tl.load(l_ptr + first + p0 + offs_p, mask=p_mask, other=0.0)
        w = tl.exp2(m - m_max)  # [BLOCK_P], 0 where masked
        a = tl.load(acc_ptr + (first + p0 + offs_p)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=p_mask[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(a * w[:, None], 0)
        denom += w * lsum
    o = acc / tl.sum(denom, 0)
    tl.store(out_ptr + seq * stride_on + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=d_mask)


def paged_decode_attention(
    query: torch.Tensor,  # [N, Hq, D]
    k_cache: torch.Tensor,  # [NB, B, Hkv, D]
    v_cache: torch.Tensor,  # [NB, B, Hkv, D]
    block_tables: torch.Tensor,  # [N, max_blocks] int32
    context_lens: torch.Tensor,  # [N] int32, >= 1
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [N, Hq, D] (written if given)
    workspace: torch.Tensor | None = None,  # fp32, >= workspace_numel(...) elements
    tuning: DecodeTuning | None = None,
) -> torch.Tensor:  # [N, Hq, D]
    """See ``reference.paged_decode_attention``. Pure but for ``out``/``workspace``.

    No host sync; the returned tensor is ready when the launching stream is.
    """
    n, hq, d = query.shape
    _, bs, hkv, _ = k_cache.shape
    assert hq % hkv == 0, "query heads must be a multiple of kv heads"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
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
    num_parts = triton.cdiv(max_blocks * bs, tuning.partition_size)
    split = num_parts > 1
    if split:
        need = workspace_numel(n, hq, d, num_parts)
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.float32, device=query.device)
        assert workspace.dtype == torch.float32 and workspace.numel() >= need
        num_partials = n * hq * num_parts
        m_ws = workspace[:num_partials]
        l_ws = workspace[num_partials:2 * num_partials]
        acc_ws = workspace[2 * num_partials:need]
    else:
        m_ws = l_ws = acc_ws = out  # unused
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    block_d = triton.next_power_of_2(d)
    _decode_partition_kernel[(hkv, num_parts, n)](
        query, k_cache, v_cache, block_tables, context_lens, out, m_ws, l_ws, acc_ws,
        scale * _LOG2E, tuning.partition_size,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, BLOCK_D=block_d, KV_BLOCK=bs, BLOCK_N=tuning.block_n,
        SPLIT=split, DOT_PRECISION=precision,
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )
    if split:
        block_p = min(triton.next_power_of_2(num_parts), max(1, 4096 // block_d))
        _decode_reduce_kernel[(hq, n)](
            out, m_ws, l_ws, acc_ws, context_lens, tuning.partition_size, num_parts,
            out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_P=block_p, num_warps=4,
        )
    return out


__all__ = ["DecodeTuning", "default_tuning", "paged_decode_attention", "workspace_numel"]
