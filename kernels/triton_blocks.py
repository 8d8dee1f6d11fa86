"""Gather / scatter one layer's KV blocks in Triton (contract: ``reference.pack_blocks``).

``pack_blocks`` copies blocks ``block_ids`` of K and V into one contiguous
staging buffer for the fabric; ``unpack_blocks`` copies such a buffer back:

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

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_blocks_kernel(
    src_k_ptr, src_v_ptr, dst_k_ptr, dst_v_ptr, ids_ptr, num_ids,
    src_block_stride, dst_block_stride,
    BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr, GATHER: tl.constexpr,
):
    num_chunks: tl.constexpr = (BLOCK_NUMEL + CHUNK - 1) // CHUNK
    pid = tl.program_id(0)
    chunk = pid % num_chunks
    rest = pid // num_chunks
    i = rest % num_ids  # position in block_ids / in the buffer
    kv = rest // num_ids  # 0: K, 1: V
    blk = tl.load(ids_ptr + i).to(tl.int64)
    if GATHER:
        src = blk * src_block_stride
        dst = i.to(tl.int64) * dst_block_stride
    else:
        src = i.to(tl.int64) * src_block_stride
        dst = blk * dst_block_stride
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


def _launch(src_k, src_v, dst_k, dst_v, block_ids, src_stride, dst_stride, block_numel, gather):
    n = block_ids.numel()
    chunk = min(triton.next_power_of_2(block_numel), 4096)
    grid = (2 * n * triton.cdiv(block_numel, chunk),)
    _copy_blocks_kernel[grid](
        _as_int(src_k), _as_int(src_v), _as_int(dst_k), _as_int(dst_v), block_ids, n,
        src_stride, dst_stride,
        BLOCK_NUMEL=block_numel, CHUNK=chunk, GATHER=gather, num_warps=4,
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
    _launch(k_cache, v_cache, out[0], out[1], block_ids.reshape(-1),
            k_cache.stride(0), block_numel, block_numel, gather=True)
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
    _launch(buf[0], buf[1], k_cache, v_cache, block_ids.reshape(-1),
            block_numel, k_cache.stride(0), block_numel, gather=False)


__all__ = ["pack_blocks", "unpack_blocks"]
