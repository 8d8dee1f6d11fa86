"""Plain-torch reference implementations of every kernel.

These define the contract the Triton kernels implement, and they are what
the engine runs on the CPU. Shapes (one layer):

    k_cache, v_cache : [NB, B, Hkv, D]        NB blocks of B tokens
    block_tables     : [N, max_blocks] int32  row i = blocks of sequence i
    context_lens     : [N] int32              tokens in the cache for seq i
                                              (new tokens included)
    query_start_loc  : [N + 1] int32          prefix sums of query lengths

Sequence i's new tokens are its last ``q_len_i`` positions:

    positions  0 ............ ctx-q_len-1 | ctx-q_len ...... ctx-1
               cached prefix (attend all)   new tokens (causal among them)
"""

from dataclasses import dataclass

import torch


def store_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [NB, B, Hkv, D]  (mutated)
    v_cache: torch.Tensor,  # [NB, B, Hkv, D]  (mutated)
    slot_mapping: torch.Tensor,  # [T] int64, every entry a valid slot
) -> None:
    """Write token t's key/value into slot ``slot_mapping[t]``. Mutates the caches."""
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping.long(), key.to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping.long(), value.to(v_cache.dtype))


def _gather_padded(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[NB, B, H, D] gathered by [N, M] block ids -> [N, M * B, H, D] (a new tensor)."""
    n, m = block_tables.shape
    _, bs, h, d = cache.shape
    return cache.index_select(0, block_tables.long().reshape(-1)).view(n, m * bs, h, d)


@dataclass(frozen=True)
class DecodeGather:
    """What every layer of a decode step gathers: the same blocks and the same mask
    (the block tables and context lengths do not change between layers), built once
    per step by ``decode_gather``."""

    block_ids: torch.Tensor  # [N * nb] int64: each sequence's first nb blocks, row by row
    num_tokens: int  # L = the longest context (gathered rows are cut to it)
    mask: torch.Tensor  # [N, 1, 1, L] float32: 0 at a sequence's tokens, -inf past them


def decode_gather(block_tables: torch.Tensor,  # [N, max_blocks] int32
                  context_lens: torch.Tensor,  # [N] int32, >= 1
                  block_size: int) -> DecodeGather:
    """The gather plan for ``paged_decode_attention``. Pure."""
    n = context_lens.shape[0]
    max_ctx = int(context_lens.max().item())
    nb = (max_ctx + block_size - 1) // block_size
    pos = torch.arange(max_ctx, device=context_lens.device)
    beyond = pos[None, :] >= context_lens[:, None]  # [N, L]
    # an additive float mask: SDPA would turn a boolean one into this on every call
    mask = torch.zeros(n, 1, 1, max_ctx, device=context_lens.device).masked_fill_(
        beyond[:, None, None, :], float("-inf"))
    return DecodeGather(block_tables[:, :nb].long().reshape(-1), max_ctx, mask)


def paged_decode_attention(
    query: torch.Tensor,  # [N, Hq, D]
    k_cache: torch.Tensor,  # [NB, B, Hkv, D]
    v_cache: torch.Tensor,  # [NB, B, Hkv, D]
    block_tables: torch.Tensor,  # [N, max_blocks] int32
    context_lens: torch.Tensor,  # [N] int32, >= 1
    scale: float,
    gather: DecodeGather | None = None,
) -> torch.Tensor:  # [N, Hq, D]
    """One query token per sequence attends to all ``context_lens[i]`` cached tokens:
    ``softmax(q . k * scale) . v`` over those tokens, query head ``h`` reading KV head
    ``h // (Hq / Hkv)`` (GQA), in float32. That is torch's
    ``scaled_dot_product_attention`` with ``enable_gqa`` and a mask of each
    sequence's valid positions, over its blocks gathered and padded to the longest.
    ``gather``: ``decode_gather(block_tables, context_lens, B)``, made once for a
    step's layers; None: made here.

    Pure: reads the caches, returns a new tensor.
    """
    n, hq, d = query.shape
    _, bs, hkv, _ = k_cache.shape
    if gather is None:
        gather = decode_gather(block_tables, context_lens.to(query.device), bs)
    length = gather.num_tokens
    rows = gather.block_ids.shape[0] // n * bs
    k = k_cache.index_select(0, gather.block_ids).view(n, rows, hkv, d)[:, :length]
    v = v_cache.index_select(0, gather.block_ids).view(n, rows, hkv, d)[:, :length]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float().unsqueeze(2), k.float().transpose(1, 2), v.float().transpose(1, 2),
        attn_mask=gather.mask, scale=scale, enable_gqa=True)  # q [N, Hq, 1, D] -> [N, Hq, 1, D]
    return out.reshape(n, hq, d).to(query.dtype)


def paged_prefill_attention(
    query: torch.Tensor,  # [T, Hq, D]  new tokens of all sequences, packed
    k_cache: torch.Tensor,  # [NB, B, Hkv, D]  new tokens already stored
    v_cache: torch.Tensor,  # [NB, B, Hkv, D]
    block_tables: torch.Tensor,  # [N, max_blocks] int32
    query_start_loc: torch.Tensor,  # [N + 1] int32
    context_lens: torch.Tensor,  # [N] int32, cached prefix + new tokens
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    """New tokens attend to their sequence's cached prefix and causally to each other:
    per sequence, torch's ``scaled_dot_product_attention`` (``enable_gqa``, in float32)
    over its blocks gathered with one ``index_select``, with an additive mask that
    hides from new token ``j`` the positions after its own (``ctx - q_len + j``).

    Pure: reads the caches, returns a new tensor.
    """
    t, hq, d = query.shape
    bs = k_cache.shape[1]
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    ctxs = context_lens.tolist()
    for i, ctx in enumerate(ctxs):
        q0, q1 = starts[i], starts[i + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        nblk = (ctx + bs - 1) // bs
        k = _gather_padded(k_cache, block_tables[i:i + 1, :nblk])[0, :ctx]  # [L, Hkv, D]
        v = _gather_padded(v_cache, block_tables[i:i + 1, :nblk])[0, :ctx]
        q_pos = torch.arange(ctx - q_len, ctx, device=query.device)
        k_pos = torch.arange(ctx, device=query.device)
        mask = torch.zeros(q_len, ctx, device=query.device).masked_fill_(
            k_pos[None, :] > q_pos[:, None], float("-inf"))  # [Q, L] future tokens
        o = torch.nn.functional.scaled_dot_product_attention(
            query[q0:q1].float().transpose(0, 1), k.float().transpose(0, 1),  # [H, Q|L, D]
            v.float().transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True)
        out[q0:q1] = o.transpose(0, 1).to(query.dtype)  # [Q, Hq, D]
    return out


def pack_blocks(
    k_cache: torch.Tensor,  # [NB, B, Hkv, D]
    v_cache: torch.Tensor,  # [NB, B, Hkv, D]
    block_ids: torch.Tensor,  # [n] int64
    out: torch.Tensor | None = None,  # [2, n, B, Hkv, D]  (mutated if given)
) -> torch.Tensor:  # [2, n, B, Hkv, D]
    """Gather one layer's blocks into one contiguous buffer (K first, then V)."""
    n = block_ids.numel()
    if out is None:
        out = torch.empty((2, n) + tuple(k_cache.shape[1:]), dtype=k_cache.dtype,
                          device=k_cache.device)
    torch.index_select(k_cache, 0, block_ids.long(), out=out[0])
    torch.index_select(v_cache, 0, block_ids.long(), out=out[1])
    return out


def unpack_blocks(
    buf: torch.Tensor,  # [2, n, B, Hkv, D]
    k_cache: torch.Tensor,  # [NB, B, Hkv, D]  (mutated)
    v_cache: torch.Tensor,  # [NB, B, Hkv, D]  (mutated)
    block_ids: torch.Tensor,  # [n] int64
) -> None:
    """Scatter a packed buffer into ``block_ids`` of the caches. Mutates the caches."""
    k_cache.index_copy_(0, block_ids.long(), buf[0])
    v_cache.index_copy_(0, block_ids.long(), buf[1])


def copy_blocks(
    src_k: torch.Tensor,  # [NB_src, B, Hkv, D]
    src_v: torch.Tensor,  # [NB_src, B, Hkv, D]
    src_ids: torch.Tensor,  # [n] int64
    dst_k: torch.Tensor,  # [NB_dst, B, Hkv, D]  (mutated)
    dst_v: torch.Tensor,  # [NB_dst, B, Hkv, D]  (mutated)
    dst_ids: torch.Tensor,  # [n] int64, no repeats
) -> None:
    """Copy block ``src_ids[i]`` of K and V into block ``dst_ids[i]`` of the other caches
    (pack then unpack, without the buffer). Mutates ``dst_k``/``dst_v``."""
    dst_k.index_copy_(0, dst_ids.long(), src_k.index_select(0, src_ids.long()))
    dst_v.index_copy_(0, dst_ids.long(), src_v.index_select(0, src_ids.long()))


def copy_blocks_layers(
    src_layers: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (K, V) [NB_src, ...]
    src_ids: torch.Tensor,  # [n] int64
    dst_layers: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (K, V), mutated
    dst_ids: torch.Tensor,  # [n] int64, no repeats
) -> None:
    """``copy_blocks`` in every layer. Mutates the dst caches."""
    for (sk, sv), (dk, dv) in zip(src_layers, dst_layers, strict=True):
        copy_blocks(sk, sv, src_ids, dk, dv, dst_ids)


WSUM_P = (1 << 31) - 1  # the checksum's prime modulus
WSUM_CHUNK = 1 << 14  # words per inner sum: |x * w| < 2**46, 2**14 of them < 2**60


def block_checksums(
    k_cache: torch.Tensor,  # [NB, B, Hkv, D], a block's bytes a multiple of 4
    v_cache: torch.Tensor,  # [NB, B, Hkv, D], same shape and dtype
    block_ids: torch.Tensor,  # [n] int64
) -> torch.Tensor:  # [2n] int64: K's blocks, then V's
    """A weighted checksum of each block's bytes read as int32 words ``x``. Pure.

    Per chunk ``c`` (1-based) of ``WSUM_CHUNK`` words (the last one zero-padded),
    ``inner_c = sum_i w_i x_i mod P`` with ``w_i = (i * 0x9E3779B1 + 0x7F4A7C15) mod
    32749 + 1`` (``i`` the word's position in its chunk), and the checksum is
    ``sum_c (inner_c * cw_c mod P) mod P`` with ``cw_c = c * 0x85EBCA6B mod P + 1``:
    every intermediate is exact in int64, so every device agrees bit for bit, and
    any changed word changes it (P is prime and above any word's weighted change).
    """
    num_blocks = k_cache.shape[0]
    k_rows = k_cache.reshape(num_blocks, -1).view(torch.uint8)
    v_rows = v_cache.reshape(num_blocks, -1).view(torch.uint8)
    return checksum_rows(torch.cat([k_rows.index_select(0, block_ids),
                                    v_rows.index_select(0, block_ids)]))


def layer_block_checksums(
    kv_layers: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (K, V) [NB, B, Hkv, D]
    block_ids: torch.Tensor,  # [n] int64
) -> torch.Tensor:  # [L, 2n] int64
    """``block_checksums`` of the same blocks in every layer, stacked. Pure."""
    return torch.stack([block_checksums(k, v, block_ids) for k, v in kv_layers])


def copy_blocks_checksums(
    src_layers: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (K, V) [NB_src, ...]
    src_ids: torch.Tensor,  # [n] int64
    dst_layers: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (K, V), mutated
    dst_ids: torch.Tensor,  # [n] int64, no repeats
) -> torch.Tensor:  # [L, 2n] int64
    """``copy_blocks_layers``, returning ``layer_block_checksums`` of the src blocks (what
    the copy moved). Mutates the dst caches."""
    sums = layer_block_checksums(src_layers, src_ids)
    copy_blocks_layers(src_layers, src_ids, dst_layers, dst_ids)
    return sums


def checksum_rows(rows: torch.Tensor) -> torch.Tensor:
    """``block_checksums``' checksum of each row of ``[m, width]`` uint8: ``[m]`` int64 on
    its device. The words are int32 when ``width`` is a multiple of 4, else bytes. Pure."""
    m, width = rows.shape
    words = rows.contiguous()
    x = (words.view(torch.int32) if width % 4 == 0 else words).to(torch.int64)  # [m, W]
    num_words = x.shape[1]
    chunk = min(WSUM_CHUNK, num_words)
    num_chunks = -(-num_words // chunk)
    if num_chunks * chunk != num_words:
        x = torch.nn.functional.pad(x, (0, num_chunks * chunk - num_words))
    pos = torch.arange(chunk, dtype=torch.int64, device=x.device)
    w = (pos * 0x9E3779B1 + 0x7F4A7C15) % 32749 + 1  # [chunk] in 1..32749
    c = torch.arange(1, num_chunks + 1, dtype=torch.int64, device=x.device)
    cw = (c * 0x85EBCA6B) % WSUM_P + 1  # [num_chunks]
    inner = torch.remainder((x.view(m, num_chunks, chunk) * w).sum(-1), WSUM_P)
    return torch.remainder(torch.remainder(inner * cw, WSUM_P).sum(-1), WSUM_P)  # [m]


def linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N]
    """``x @ weight^T + bias``: ``torch.nn.functional.linear``, the contract of
    ``triton_gemv.gemv`` (which accumulates in float32 and rounds once to x's dtype).
    Pure: returns a new tensor."""
    return torch.nn.functional.linear(x, weight, bias)


def rms_norm(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [K]
    eps: float,
) -> torch.Tensor:  # [M, K]
    """RMSNorm rounded as the CUDA kernels round it: normalise in float32, round to
    x's dtype, multiply by the weight in float32, round. Pure."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * y.float()).to(x.dtype)
