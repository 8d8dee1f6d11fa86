"""Gather / scatter one layer's KV blocks in Triton (contracts: ``reference.pack_blocks``,
``reference.unpack_blocks``, ``reference.copy_blocks``).

``pack_blocks`` copies blocks ``block_ids`` of K and V into one contiguous
staging buffer for the fabric; ``unpack_blocks`` copies such a buffer back;
``copy_blocks`` moves blocks from one cache straight into other block ids of
another (the ``cuda_ipc`` fabric path, where the other cache is a peer's):

    k_cache[ids[0]] k_cache[ids[1]] ...   v_cache[ids[0]] ...
          |               |                      |
    buf = [ K: block 0 | block 1 | ... ] [ V: block 0 | block 1 | ... ]   [2, n, B, Hkv, D]

A block ([B, Hkv, D]) is contiguous in the cache, so the copy is flat: one
program moves ``CHUNK`` elements of one block of K or V. Elements are moved
as integers of the same width, so any dtype (bf16, fp8 ...) copies bit-exact.
Caches whose blocks are not contiguous fall back to the torch reference.
"""

import torch
import triton
import triton.language as tl

from pdserve.kernels import reference
from pdserve.kernels.layers import spanning_view, uniform_layer_stride

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_blocks_kernel(
    src_k_ptr, src_v_ptr, dst_k_ptr, dst_v_ptr, src_ids_ptr, dst_ids_ptr, num_ids,
    src_block_stride, dst_block_stride, src_layer_stride, dst_layer_stride,
    BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr, SRC_BY_ID: tl.constexpr,
    DST_BY_ID: tl.constexpr,
):
    """Block ``i`` goes from src block ``src_ids[i]`` (or ``i``, a packed buffer) to dst
    block ``dst_ids[i]`` (or ``i``), in layer ``program_id(1)`` (layers a fixed number of
    elements apart on each side)."""
    num_chunks: tl.constexpr = (BLOCK_NUMEL + CHUNK - 1) // CHUNK
    pid = tl.program_id(0)
    chunk = pid % num_chunks
    rest = pid // num_chunks
    i = rest % num_ids  # position in block_ids / in the buffer
    kv = rest // num_ids  # 0: K, 1: V
    src_blk = i.to(tl.int64)
    dst_blk = i.to(tl.int64)
    if SRC_BY_ID:
        src_blk = tl.load(src_ids_ptr + i).to(tl.int64)
    if DST_BY_ID:
        dst_blk = tl.load(dst_ids_ptr + i).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    src = layer * src_layer_stride + src_blk * src_block_stride
    dst = layer * dst_layer_stride + dst_blk * dst_block_stride
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < BLOCK_NUMEL
    if kv == 0:
        x = tl.load(src_k_ptr + src + offs, mask=mask)
        tl.store(dst_k_ptr + dst + offs, x, mask=mask)
    else:
        x = tl.load(src_v_ptr + src + offs, mask=mask)
        tl.store(dst_v_ptr + dst + offs, x, mask=mask)


def _blocks_contiguous(cache: torch.Tensor) -> bool:
    _, bs, h, d = cache.shape
    return cache.stride()[1:] == (h * d, d, 1)


def _as_int(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_WIDTH[t.element_size()])


def _launch(src_k, src_v, dst_k, dst_v, src_ids, dst_ids, src_stride, dst_stride,
            block_numel, num_layers=1, src_layer_stride=0, dst_layer_stride=0):
    """``src_ids``/``dst_ids``: [n] block ids, or None for a packed buffer's order.
    Strides in elements; layers after the first lie ``*_layer_stride`` further on."""
    ids = src_ids if src_ids is not None else dst_ids
    n = ids.numel()
    chunk = min(triton.next_power_of_2(block_numel), 4096)
    grid = (2 * n * triton.cdiv(block_numel, chunk), num_layers)
    width = _INT_OF_WIDTH[src_k.element_size()]
    if num_layers > 1:  # hand the kernel views spanning every layer it steps to
        size = src_k.element_size()
        src_k, src_v = (spanning_view(t, num_layers, src_layer_stride * size, width)
                        for t in (src_k, src_v))
        dst_k, dst_v = (spanning_view(t, num_layers, dst_layer_stride * size, width)
                        for t in (dst_k, dst_v))
    _copy_blocks_kernel[grid](
        _as_int(src_k), _as_int(src_v), _as_int(dst_k), _as_int(dst_v),
        ids if src_ids is None else src_ids, ids if dst_ids is None else dst_ids, n,
        src_stride, dst_stride, src_layer_stride, dst_layer_stride,
        BLOCK_NUMEL=block_numel, CHUNK=chunk,
        SRC_BY_ID=src_ids is not None, DST_BY_ID=dst_ids is not None, num_warps=4,
    )


def pack_blocks(
    k_cache: torch.Tensor,  # [NB, B, Hkv, D]
    v_cache: torch.Tensor,  # [NB, B, Hkv, D]
    block_ids: torch.Tensor,  # [n] int64 (or int32)
    out: torch.Tensor | None = None,  # [2, n, B, Hkv, D]  (mutated if given)
) -> torch.Tensor:  # [2, n, B, Hkv, D]
    """See ``reference.pack_blocks``. Reads the caches; writes only ``out``; no host sync."""
    n = block_ids.numel()
    if out is None:
        out = torch.empty((2, n) + tuple(k_cache.shape[1:]), dtype=k_cache.dtype,
                          device=k_cache.device)
    usable = (_blocks_contiguous(k_cache) and _blocks_contiguous(v_cache)
              and k_cache.dtype == v_cache.dtype == out.dtype and out.is_contiguous())
    if not usable:
        return reference.pack_blocks(k_cache, v_cache, block_ids, out)
    if n == 0:
        return out
    block_numel = k_cache[0].numel()
    _launch(k_cache, v_cache, out[0], out[1], block_ids.reshape(-1), None,
            k_cache.stride(0), block_numel, block_numel)
    return out


def unpack_blocks(
    buf: torch.Tensor,  # [2, n, B, Hkv, D]
    k_cache: torch.Tensor,  # [NB, B, Hkv, D]  (mutated)
    v_cache: torch.Tensor,  # [NB, B, Hkv, D]  (mutated)
    block_ids: torch.Tensor,  # [n] int64 (or int32), no repeats
) -> None:
    """See ``reference.unpack_blocks``. Mutates the caches; no host sync."""
    n = block_ids.numel()
    usable = (_blocks_contiguous(k_cache) and _blocks_contiguous(v_cache)
              and k_cache.dtype == v_cache.dtype == buf.dtype and buf.is_contiguous())
    if not usable:
        reference.unpack_blocks(buf, k_cache, v_cache, block_ids)
        return
    if n == 0:
        return
    block_numel = k_cache[0].numel()
    _launch(buf[0], buf[1], k_cache, v_cache, None, block_ids.reshape(-1),
            block_numel, k_cache.stride(0), block_numel)


def copy_blocks(
    src_k: torch.Tensor,  # [NB_src, B, Hkv, D]
    src_v: torch.Tensor,  # [NB_src, B, Hkv, D]
    src_ids: torch.Tensor,  # [n] int64 (or int32)
    dst_k: torch.Tensor,  # [NB_dst, B, Hkv, D]  (mutated)
    dst_v: torch.Tensor,  # [NB_dst, B, Hkv, D]  (mutated)
    dst_ids: torch.Tensor,  # [n] int64 (or int32), no repeats
) -> None:
    """See ``reference.copy_blocks``. Mutates the dst caches; no host sync."""
    caches = (src_k, src_v, dst_k, dst_v)
    usable = (all(_blocks_contiguous(c) for c in caches)
              and len({c.dtype for c in caches}) == 1
              and tuple(src_k.shape[1:]) == tuple(dst_k.shape[1:]))
    if not usable:
        reference.copy_blocks(src_k, src_v, src_ids, dst_k, dst_v, dst_ids)
        return
    if src_ids.numel() == 0:
        return
    _launch(src_k, src_v, dst_k, dst_v, src_ids.reshape(-1), dst_ids.reshape(-1),
            src_k.stride(0), dst_k.stride(0), src_k[0].numel())


def copy_blocks_layers(
    src_layers: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (K, V) [NB_src, ...]
    src_ids: torch.Tensor,  # [n] int64
    dst_layers: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (K, V), mutated
    dst_ids: torch.Tensor,  # [n] int64, no repeats
) -> None:
    """``copy_blocks`` in every layer: one launch when each side's layers are evenly
    spaced views of one allocation (``layers.uniform_layer_stride``), one per layer
    otherwise. Mutates the dst caches; no host sync."""
    src_stride, dst_stride = uniform_layer_stride(src_layers), uniform_layer_stride(dst_layers)
    sk, sv = src_layers[0]
    dk, dv = dst_layers[0]
    usable = (src_stride is not None and dst_stride is not None
              and len(src_layers) == len(dst_layers)
              and all(_blocks_contiguous(c) for c in (sk, sv, dk, dv))
              and len({c.dtype for c in (sk, sv, dk, dv)}) == 1
              and tuple(sk.shape[1:]) == tuple(dk.shape[1:])
              and src_stride % sk.element_size() == 0 and dst_stride % sk.element_size() == 0)
    if not usable:
        for (sk, sv), (dk, dv) in zip(src_layers, dst_layers, strict=True):
            copy_blocks(sk, sv, src_ids, dk, dv, dst_ids)
        return
    if src_ids.numel() == 0:
        return
    size = sk.element_size()
    _launch(sk, sv, dk, dv, src_ids.reshape(-1), dst_ids.reshape(-1), sk.stride(0),
            dk.stride(0), sk[0].numel(), len(src_layers), src_stride // size,
            dst_stride // size)


__all__ = ["pack_blocks", "unpack_blocks", "copy_blocks", "copy_blocks_layers"]
