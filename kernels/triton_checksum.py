"""Block checksums in Triton (contract: ``reference.block_checksums``).

One program per block of K or V (and per layer: ``layer_block_checksums``
checks every layer of an engine's KV cache in one launch) reads the block's
bytes once as int32 words, in tiles of ``TILE`` words. Per word the math stays
in int32 (the weight, and the products of the word's two 16-bit halves with
it); only the tile sums widen to int64, which holds the chunk sum and the
running checksum, so the kernel keeps up with memory. The torch reference
widens every word to int64 and makes several passes.

    program i < n:  K block ids[i]        program n + i:  V block ids[i]
    words 0 .. W-1 in chunks of CHUNK (weights restart per chunk), tiles of TILE
"""

import torch
import triton
import triton.language as tl

from pdserve.kernels.layers import spanning_view, uniform_layer_stride
from pdserve.kernels.reference import WSUM_CHUNK, WSUM_P

# The word weights w_i = (i * 0x9E3779B1 + 0x7F4A7C15) mod 32749 + 1 in int32: reducing
# both constants mod 32749 first keeps i * B + C below 2**31 for any i < 2**14 (a chunk).
_W_MUL, _W_ADD, _W_MOD = 0x9E3779B1 % 32749, 0x7F4A7C15 % 32749, 32749


@triton.jit
def _checksum_kernel(k_ptr, v_ptr, ids_ptr, out_ptr, num_ids, block_words, layer_words,
                     dst_k_ptr, dst_v_ptr, dst_ids_ptr, dst_layer_words,
                     P: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr,
                     W_MUL: tl.constexpr, W_ADD: tl.constexpr, W_MOD: tl.constexpr,
                     COPY: tl.constexpr):
    """Checksum of block ``ids[i]`` (K for program i < n, V for n + i) in layer
    ``program_id(1)``; with ``COPY``, also write each word it reads to block
    ``dst_ids[i]`` of the dst caches (a copy that digests what it moves, one read)."""
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    i = pid % num_ids
    blk = tl.load(ids_ptr + i).to(tl.int64)
    base = layer * layer_words + blk * block_words
    if COPY:
        dst_blk = tl.load(dst_ids_ptr + i).to(tl.int64)
        dst_base = layer * dst_layer_words + dst_blk * block_words
    offs = tl.arange(0, TILE)
    total = tl.zeros([1], tl.int64)
    num_chunks = tl.cdiv(block_words, CHUNK)
    for c in range(0, num_chunks):
        acc = tl.zeros([1], tl.int64)
        for t0 in range(0, CHUNK, TILE):
            pos = t0 + offs  # position in the chunk
            word = c * CHUNK + pos
            mask = (pos < CHUNK) & (word < block_words)
            if pid < num_ids:
                x = tl.load(k_ptr + base + word, mask=mask, other=0)
                if COPY:
                    tl.store(dst_k_ptr + dst_base + word, x, mask=mask)
            else:
                x = tl.load(v_ptr + base + word, mask=mask, other=0)
                if COPY:
                    tl.store(dst_v_ptr + dst_base + word, x, mask=mask)
            w = (pos * W_MUL + W_ADD) % W_MOD + 1  # int32, in 1..32749
            # x * w needs 47 bits: split x into a signed high and an unsigned low half,
            # each product fits int32, and only the sums widen to int64
            lo = (x & 0xFFFF) * w
            hi = (x >> 16) * w
            acc += tl.sum(lo.to(tl.int64), axis=0) + tl.sum(hi.to(tl.int64), axis=0) * 65536
        inner = acc % P
        inner = tl.where(inner < 0, inner + P, inner)
        c64 = tl.zeros([1], tl.int64) + (c + 1)  # int64 before the multiply
        cw = (c64 * 0x85EBCA6B) % P + 1
        total = (total + (inner * cw) % P) % P
    tl.store(out_ptr + layer * tl.num_programs(0) + pid + tl.arange(0, 1), total)


def _launch(k0: torch.Tensor, v0: torch.Tensor, block_ids: torch.Tensor, num_layers: int,
            layer_words: int, tile: int, dst: tuple | None = None) -> torch.Tensor:
    """Checksums of ``block_ids`` in ``num_layers`` layers ``layer_words`` int32 words
    apart, starting at caches ``k0``/``v0``: ``[num_layers, 2n]`` int64. ``dst``:
    (dst K0, dst V0, dst ids, dst layer words) to copy the blocks to as they are read."""
    block_bytes = k0[0].numel() * k0.element_size()
    n = block_ids.numel()
    out = torch.empty((num_layers, 2 * n), dtype=torch.int64, device=k0.device)
    if n == 0 or num_layers == 0:
        return out
    assert block_bytes % 4 == 0 and k0.is_contiguous() and v0.is_contiguous()
    chunk = min(WSUM_CHUNK, block_bytes // 4)
    k_words = spanning_view(k0, num_layers, 4 * layer_words, torch.int32)
    v_words = spanning_view(v0, num_layers, 4 * layer_words, torch.int32)
    if dst is None:
        dk_words, dv_words, dst_ids, dst_layer_words = k_words, v_words, block_ids, 0
    else:
        dk, dv, dst_ids, dst_layer_words = dst
        dk_words = spanning_view(dk, num_layers, 4 * dst_layer_words, torch.int32)
        dv_words = spanning_view(dv, num_layers, 4 * dst_layer_words, torch.int32)
    _checksum_kernel[(2 * n, num_layers)](
        k_words, v_words, block_ids, out, n, block_bytes // 4, layer_words,
        dk_words, dv_words, dst_ids, dst_layer_words,
        P=WSUM_P, CHUNK=chunk, TILE=min(tile, triton.next_power_of_2(chunk)),
        W_MUL=_W_MUL, W_ADD=_W_ADD, W_MOD=_W_MOD, COPY=dst is not None, num_warps=4)
    return out


def block_checksums(k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_ids: torch.Tensor, tile: int = 2048) -> torch.Tensor:
    """See ``reference.block_checksums``. Pure; no host sync."""
    return _launch(k_cache, v_cache, block_ids, 1, 0, tile)[0]


def layer_block_checksums(kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
                          block_ids: torch.Tensor, tile: int = 2048) -> torch.Tensor:
    """``block_checksums`` of every layer, ``[L, 2n]`` int64: one launch when the layers
    are evenly spaced views of one allocation, one per layer otherwise. Pure; no sync."""
    stride = uniform_layer_stride(kv_layers)
    if stride is None or stride % 4:
        return torch.stack([block_checksums(k, v, block_ids, tile) for k, v in kv_layers])
    k0, v0 = kv_layers[0]
    return _launch(k0, v0, block_ids, len(kv_layers), stride // 4, tile)


def copy_blocks_checksums(src_layers: list[tuple[torch.Tensor, torch.Tensor]],
                          src_ids: torch.Tensor,
                          dst_layers: list[tuple[torch.Tensor, torch.Tensor]],
                          dst_ids: torch.Tensor, tile: int = 2048) -> torch.Tensor:
    """See ``reference.copy_blocks_checksums``: copy the blocks in every layer and
    return the src blocks' checksums ``[L, 2n]``, reading each block once. One launch
    when both sides' layers are evenly spaced views of one allocation. Mutates the dst
    caches; no host sync."""
    src_stride, dst_stride = uniform_layer_stride(src_layers), uniform_layer_stride(dst_layers)
    k0, v0 = src_layers[0]
    dk, dv = dst_layers[0]
    one_launch = (src_stride is not None and dst_stride is not None
                  and src_stride % 4 == 0 and dst_stride % 4 == 0
                  and dk.is_contiguous() and dv.is_contiguous()
                  and dk.dtype == k0.dtype and dk.shape[1:] == k0.shape[1:])
    if one_launch:
        return _launch(k0, v0, src_ids, len(src_layers), src_stride // 4, tile,
                       (dk, dv, dst_ids, dst_stride // 4))
    return torch.stack([_launch(k, v, src_ids, 1, 0, tile, (dk, dv, dst_ids, 0))[0]
                        for (k, v), (dk, dv) in zip(src_layers, dst_layers, strict=True)])
