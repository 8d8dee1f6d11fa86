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
                     P: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr,
                     W_MUL: tl.constexpr, W_ADD: tl.constexpr, W_MOD: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    i = pid % num_ids
    blk = tl.load(ids_ptr + i).to(tl.int64)
    base = layer * layer_words + blk * block_words
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
            else:
                x = tl.load(v_ptr + base + word, mask=mask, other=0)
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
            layer_words: int, tile: int) -> torch.Tensor:
    """Checksums of ``block_ids`` in ``num_layers`` layers ``layer_words`` int32 words
    apart, starting at caches ``k0``/``v0``: ``[num_layers, 2n]`` int64."""
    block_bytes = k0[0].numel() * k0.element_size()
    n = block_ids.numel()
    out = torch.empty((num_layers, 2 * n), dtype=torch.int64, device=k0.device)
    if n == 0 or num_layers == 0:
        return out
    assert block_bytes % 4 == 0 and k0.is_contiguous() and v0.is_contiguous()
    chunk = min(WSUM_CHUNK, block_bytes // 4)
    k_words = spanning_view(k0, num_layers, 4 * layer_words, torch.int32)
    v_words = spanning_view(v0, num_layers, 4 * layer_words, torch.int32)
    _checksum_kernel[(2 * n, num_layers)](
        k_words, v_words, block_ids, out, n, block_bytes // 4, layer_words,
        P=WSUM_P, CHUNK=chunk, TILE=min(tile, triton.next_power_of_2(chunk)),
        W_MUL=_W_MUL, W_ADD=_W_ADD, W_MOD=_W_MOD, num_warps=4)
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
