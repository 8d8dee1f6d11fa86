"""KV store by slot mapping in Triton (contract: ``reference.store_kv``).

Token t's key and value rows ([Hkv, D] each) go to slot ``slot_mapping[t]``,
i.e. block ``slot // B``, offset ``slot % B``. One program moves
``BLOCK_T`` tokens of both K and V, as a [BLOCK_T, Hkv, D] tile; the new
rows may be a strided view (for example a slice of a fused QKV projection).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    t_mask = toks < num_tokens
    slot = tl.load(slot_ptr + toks, mask=t_mask, other=0).to(tl.int64)
    blk = slot // KV_BLOCK
    row = slot % KV_BLOCK
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (t_mask[:, None, None] & (offs_h < NUM_HEADS)[None, :, None]
            & (offs_d < HEAD_DIM)[None, None, :])  # [BLOCK_T, BLOCK_H, BLOCK_D]
    t64 = toks.to(tl.int64)[:, None, None]
    h = offs_h[None, :, None]
    d = offs_d[None, None, :]

    k = tl.load(key_ptr + t64 * stride_kt + h * stride_kh + d, mask=mask)
    dst_k = (blk * stride_kcb + row * stride_kct)[:, None, None] + h * stride_kch + d
    tl.store(k_cache_ptr + dst_k, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + t64 * stride_vt + h * stride_vh + d, mask=mask)
    dst_v = (blk * stride_vcb + row * stride_vct)[:, None, None] + h * stride_vch + d
    tl.store(v_cache_ptr + dst_v, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [NB, B, Hkv, D]  (mutated)
    v_cache: torch.Tensor,  # [NB, B, Hkv, D]  (mutated)
    slot_mapping: torch.Tensor,  # [T] int64, every entry a valid slot
) -> None:
    """See ``reference.store_kv``. Mutates the caches; no host sync."""
    t, h, d = key.shape
    if t == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    block_h = triton.next_power_of_2(h)
    block_d = triton.next_power_of_2(d)
    block_t = max(1, min(triton.next_power_of_2(t), 8192 // (block_h * block_d)))
    _store_kv_kernel[(triton.cdiv(t, block_t),)](
        key, value, k_cache, v_cache, slot_mapping, t,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=h, BLOCK_H=block_h, HEAD_DIM=d, BLOCK_D=block_d,
        KV_BLOCK=k_cache.shape[1], BLOCK_T=block_t, num_warps=4,
    )


__all__ = ["store_kv"]
