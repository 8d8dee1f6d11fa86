"""Prefill attention over a paged KV cache in Triton (flash-attention style).

The new tokens of N sequences are packed in ``query`` (``query_start_loc``
gives each sequence's rows). Each new token attends to its sequence's whole
cached prefix and causally to the new tokens up to itself; the new tokens'
K/V are already in the cache (contract: ``reference.paged_prefill_attention``).

One program computes a tile of ``BLOCK_M`` query rows of one sequence for one
query head, looping over key/value tiles of ``BLOCK_N`` tokens gathered
through the block table:

    keys:     0 ........................ prefix+m0 ..... prefix+m0+BLOCK_M
              |  full tiles, no mask     | diagonal tiles,| (above the diagonal:
              |                          | causal mask    |  never loaded)
    query rows m0 .. m0+BLOCK_M-1 sit at positions prefix+m0 ..

Tiles are found on the device, with no host sync: sequence i owns the program
rows ``[qsl[i] // BLOCK_M + i, qsl[i+1] // BLOCK_M + i + 1)`` (at least
``cdiv(q_len_i, BLOCK_M)`` of them; spare ones exit at once), and a program
finds its sequence by binary search over ``query_start_loc``. Within a
sequence the heaviest tile (the last rows) starts first.
"""

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class PrefillTuning:
    """Launch shape: query rows and key tokens per tile, warps, pipeline depth."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_tuning(head_dim: int, dtype: torch.dtype, device: torch.device,
                   num_query_rows: int = 1 << 30) -> PrefillTuning:
    """``num_query_rows``: new tokens times query heads; small batches get smaller tiles."""
    if device.type != "cuda":
        return PrefillTuning(block_m=32, block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return PrefillTuning(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim > 128 or num_query_rows // 128 < 2 * _num_sms(device):
        return PrefillTuning(block_m=64, block_n=64, num_warps=4, num_stages=2 if head_dim > 128
                             else 3)
    return PrefillTuning()


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k_ptr, v_ptr, table, kv_head, kv_lo, kv_hi, q_pos,
                 qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                 offs_n, offs_d, d_mask,
                 KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over keys [kv_lo, kv_hi); CAUSAL masks keys past each row's position."""
    for kv0 in range(kv_lo, kv_hi, BLOCK_N):
        toks = kv0 + offs_n  # [BLOCK_N]
        if CAUSAL:
            t_mask = toks < kv_hi
            blk = tl.load(table + toks // KV_BLOCK, mask=t_mask, other=0).to(tl.int64)
        else:
            blk = tl.load(table + toks // KV_BLOCK).to(tl.int64)
        row = toks % KV_BLOCK
        k_off = (blk * stride_kb + row * stride_kt + kv_head * stride_kh)[:, None] + offs_d[None, :]
        v_off = (blk * stride_vb + row * stride_vt + kv_head * stride_vh)[:, None] + offs_d[None, :]
        if CAUSAL:
            kv_mask = t_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + k_off, mask=kv_mask, other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptr + k_off)
        else:
            k = tl.load(k_ptr + k_off, mask=d_mask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if CAUSAL:
            visible = (toks[None, :] <= q_pos[:, None]) & t_mask[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if CAUSAL:
            v = tl.load(v_ptr + v_off, mask=kv_mask, other=0.0)
        elif HEAD_DIM == BLOCK_D:
            v = tl.load(v_ptr + v_off)
        else:
            v = tl.load(v_ptr + v_off, mask=d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, qsl_ptr, ctx_ptr, out_ptr,
    qk_scale, num_seqs,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tn, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0)
    tile = tl.program_id(1)
    # The sequence: the last i with qsl[i] // BLOCK_M + i <= tile.
    lo = tile * 0
    hi = lo + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        owns = tl.load(qsl_ptr + mid) // BLOCK_M + mid <= tile
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid)
    seq = lo
    q_start = tl.load(qsl_ptr + seq)
    q_end = tl.load(qsl_ptr + seq + 1)
    q_len = q_end - q_start
    m0 = (q_end // BLOCK_M + seq - tile) * BLOCK_M  # last tile first
    if m0 >= q_len:
        return
    ctx = tl.load(ctx_ptr + seq)
    prefix = ctx - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)  # [BLOCK_M, BLOCK_D]
    q_pos = prefix + offs_m  # [BLOCK_M]

    kv_head = head // GROUP
    table = tables_ptr + seq.to(tl.int64) * stride_tn
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end = (prefix + m0) // BLOCK_N * BLOCK_N  # keys every row of the tile sees
    kv_end = tl.minimum(prefix + m0 + BLOCK_M, ctx)
    acc, l_i, m_i = _attend_tile(
        acc, l_i, m_i, q, k_ptr, v_ptr, table, kv_head, 0, full_end, q_pos, qk_scale,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        offs_n, offs_d, d_mask, KV_BLOCK, BLOCK_N, HEAD_DIM, BLOCK_D, False, DOT_PRECISION)
    acc, l_i, m_i = _attend_tile(
        acc, l_i, m_i, q, k_ptr, v_ptr, table, kv_head, full_end, kv_end, q_pos, qk_scale,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        offs_n, offs_d, d_mask, KV_BLOCK, BLOCK_N, HEAD_DIM, BLOCK_D, True, DOT_PRECISION)

    o = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(
    query: torch.Tensor,  # [T, Hq, D]  new tokens of all sequences, packed
    k_cache: torch.Tensor,  # [NB, B, Hkv, D]  new tokens already stored
    v_cache: torch.Tensor,  # [NB, B, Hkv, D]
    block_tables: torch.Tensor,  # [N, max_blocks] int32
    query_start_loc: torch.Tensor,  # [N + 1] int32
    context_lens: torch.Tensor,  # [N] int32, cached prefix + new tokens
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [T, Hq, D] (written if given)
    tuning: PrefillTuning | None = None,
) -> torch.Tensor:  # [T, Hq, D]
    """See ``reference.paged_prefill_attention``. Pure but for ``out``; no host sync."""
    t, hq, d = query.shape
    _, bs, hkv, _ = k_cache.shape
    assert hq % hkv == 0, "query heads must be a multiple of kv heads"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if query.stride(-1) != 1:
        query = query.contiguous()
    if out is None:
        out = torch.empty_like(query)
    num_seqs = query_start_loc.shape[0] - 1
    if t == 0 or num_seqs == 0:
        return out
    if tuning is None:
        tuning = default_tuning(d, k_cache.dtype, query.device, t * hq)
    num_tiles = t // tuning.block_m + num_seqs  # >= sum_i cdiv(q_len_i, block_m)
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    _prefill_kernel[(hq, num_tiles)](
        query, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        scale * _LOG2E, num_seqs,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), KV_BLOCK=bs,
        BLOCK_M=tuning.block_m, BLOCK_N=tuning.block_n, DOT_PRECISION=precision,
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )
    return out


__all__ = ["PrefillTuning", "default_tuning", "paged_prefill_attention"]
