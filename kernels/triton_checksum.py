"""Block checksums in Triton (contract: ``reference.block_checksums``).

One program per block of K or V reads the block's bytes once as int32 words,
in tiles of ``TILE`` words, and keeps the chunk sum and the running checksum
in int64 scalars, so a layer's blocks cost one pass over their bytes (the
torch reference widens every word to int64 and makes several passes).

    program i < n:  K block ids[i]        program n + i:  V block ids[i]
    words 0 .. W-1 in chunks of CHUNK (weights restart per chunk), tiles of TILE
"""

import torch
import triton
import triton.language as tl

from pdserve.kernels.reference import WSUM_CHUNK, WSUM_P


@triton.jit
def _checksum_kernel(k_ptr, v_ptr, ids_ptr, out_ptr, num_ids, block_words,
                     P: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr):
    pid = tl.program_id(0)
    i = pid % num_ids
    blk = tl.load(ids_ptr + i).to(tl.int64)
    base = blk * block_words
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
            w = (pos.to(tl.int64) * 0x9E3779B1 + 0x7F4A7C15) % 32749 + 1
            acc += tl.sum(x.to(tl.int64) * w, axis=0)
        inner = acc % P
        inner = tl.where(inner < 0, inner + P, inner)
        c64 = tl.zeros([1], tl.int64) + (c + 1)  # int64 before the multiply
        cw = (c64 * 0x85EBCA6B) % P + 1
        total = (total + (inner * cw) % P) % P
    tl.store(out_ptr + pid + tl.arange(0, 1), total)


def block_checksums(k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_ids: torch.Tensor, tile: int = 2048) -> torch.Tensor:
    """See ``reference.block_checksums``. Pure; no host sync."""
    num_blocks = k_cache.shape[0]
    block_bytes = k_cache[0].numel() * k_cache.element_size()
    n = block_ids.numel()
    out = torch.empty(2 * n, dtype=torch.int64, device=k_cache.device)
    if n == 0:
        return out
    assert block_bytes % 4 == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
    k_words = k_cache.view(num_blocks, -1).view(torch.uint8).view(torch.int32)
    v_words = v_cache.view(num_blocks, -1).view(torch.uint8).view(torch.int32)
    chunk = min(WSUM_CHUNK, block_bytes // 4)
    _checksum_kernel[(2 * n,)](k_words, v_words, block_ids, out, n, block_bytes // 4,
                               P=WSUM_P, CHUNK=chunk,
                               TILE=min(tile, triton.next_power_of_2(chunk)), num_warps=4)
    return out
