"""Fused element-wise kernels for the decoder layer on CUDA, each one launch.

On a small decode batch every launch costs a few microseconds whatever it
does, so the layer's element-wise work is folded into three kernels:

- ``rms_norm``: optional residual add (``residual += x``, in place) then
  RMSNorm; rounds like the torch code it replaces (sum in the model dtype,
  normalise in float32, round, multiply by the weight, round).
- ``silu_and_mul``: ``silu(gate) * up`` from the fused gate/up projection.
- ``rope_store_kv``: rotary embedding on q (in place) and k, and the store of
  the rotated k and v into their cache slots; a slot < 0 is skipped (padding
  rows of a CUDA-graph batch).

Each has a plain-torch reference here (``*_reference``) that rounds the same
way; ``tests/engine/test_gpu_fused.py`` checks one against the other.
"""

import torch
import triton
import triton.language as tl

from pdserve.kernels import reference
from pdserve.kernels.pdl import pdl_enter, use_pdl


# ---- references ----------------------------------------------------------------------
def rms_norm_reference(x, weight, eps, residual=None):
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    return reference.rms_norm(x, weight, eps)


def silu_and_mul_reference(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rope_store_kv_reference(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
    c = cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
    s = sin[positions].unsqueeze(1).to(q.dtype)
    half = q.shape[-1] // 2

    def rot(x):
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    q.copy_(q * c + rot(q) * s)
    k_rot = k * c + rot(k) * s
    keep = slot_mapping >= 0
    nb, bs, h, d = k_cache.shape
    slots = slot_mapping[keep].long()
    k_cache.view(nb * bs, h, d).index_copy_(0, slots, k_rot[keep].to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, slots, v[keep].to(v_cache.dtype))


# ---- kernels ---------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    y = (xf * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor,  # [T, H]
             weight: torch.Tensor,  # [H]
             eps: float,
             residual: torch.Tensor | None = None,  # [T, H] (mutated: += x)
             ) -> torch.Tensor:  # [T, H]
    """RMSNorm of ``x`` (or of ``residual + x``, written back into ``residual``)."""
    t, h = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if t == 0:
        return out
    block = triton.next_power_of_2(h)
    _rms_norm_kernel[(t,)](
        x, residual if residual is not None else x, weight, out,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), h, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)),
        PDL=use_pdl(x), launch_pdl=use_pdl(x))
    return out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    t, two_i = gate_up.shape
    n = two_i // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    if t == 0:
        return out
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0),
                                                  out.stride(0), BLOCK=block, num_warps=4,
                                                  PDL=use_pdl(gate_up),
                                                  launch_pdl=use_pdl(gate_up))
    return out


@triton.jit
def _rotate(base, stride_h, heads, offs, mask, c, s, HALF: tl.constexpr):
    """Rotate half-split rows ``[x1 | x2]`` -> ``[x1 c - x2 s | x2 c + x1 s]``, rounding
    each product and the sum to the storage dtype as the torch code does."""
    dt = base.dtype.element_ty
    ptr = base + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)
    o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_c,
    stride_cb, stride_ct, stride_ch,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, BLOCK_H: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, KV_BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    dt = q_ptr.dtype.element_ty
    c = tl.load(cos_ptr + pos * stride_c + offs, mask=d_mask, other=0.0).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_c + offs, mask=d_mask, other=0.0).to(dt).to(tl.float32)
    heads = tl.arange(0, BLOCK_H)
    c = c[None, :]
    s = s[None, :]

    q_mask = (heads < NUM_Q)[:, None] & d_mask[None, :]
    q_base = q_ptr + t * stride_qt
    o1, o2 = _rotate(q_base, stride_qh, heads, offs, q_mask, c, s, HALF)
    q_out = q_base + heads[:, None] * stride_qh + offs[None, :]
    tl.store(q_out, o1, mask=q_mask)
    tl.store(q_out + HALF, o2, mask=q_mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        kv_mask = (heads < NUM_KV)[:, None] & d_mask[None, :]
        k1, k2 = _rotate(k_ptr + t * stride_kt, stride_kh, heads, offs, kv_mask, c, s, HALF)
        dst = (slot // KV_BLOCK) * stride_cb + (slot % KV_BLOCK) * stride_ct \
            + heads[:, None] * stride_ch + offs[None, :]
        cdt = kc_ptr.dtype.element_ty
        tl.store(kc_ptr + dst, k1.to(cdt), mask=kv_mask)
        tl.store(kc_ptr + dst + HALF, k2.to(cdt), mask=kv_mask)
        v_src = v_ptr + t * stride_vt + heads[:, None] * stride_vh + offs[None, :]
        v1 = tl.load(v_src, mask=kv_mask, other=0.0)
        v2 = tl.load(v_src + HALF, mask=kv_mask, other=0.0)
        tl.store(vc_ptr + dst, v1.to(cdt), mask=kv_mask)
        tl.store(vc_ptr + dst + HALF, v2.to(cdt), mask=kv_mask)


def rope_store_kv(
    q: torch.Tensor,  # [T, Hq, D] (mutated: rotated in place; may be a strided view)
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int64
    cos: torch.Tensor,  # [P, D] float32, halves equal
    sin: torch.Tensor,  # [P, D]
    k_cache: torch.Tensor,  # [NB, B, Hkv, D] (mutated)
    v_cache: torch.Tensor,  # [NB, B, Hkv, D] (mutated)
    slot_mapping: torch.Tensor,  # [T] int64; < 0 skips the store
) -> None:
    """Rotate q in place; write rotated k and v to their slots. No host sync."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    if t == 0:
        return
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    half = d // 2
    _rope_store_kernel[(t,)](
        q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_Q=hq, NUM_KV=hkv, BLOCK_H=triton.next_power_of_2(max(hq, hkv)),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), KV_BLOCK=k_cache.shape[1],
        num_warps=4, PDL=use_pdl(q), launch_pdl=use_pdl(q))


__all__ = ["rms_norm", "rms_norm_reference", "rope_store_kv", "rope_store_kv_reference",
           "silu_and_mul", "silu_and_mul_reference"]
