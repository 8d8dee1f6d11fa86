"""Dispatch: the Triton kernels on CUDA tensors, the torch references elsewhere."""

import torch

from pdserve.kernels import reference

GEMV_MAX_ROWS = 8  # = triton_gemv.MAX_ROWS (not imported: that module needs triton)
GEMV_DTYPES = (torch.float16, torch.bfloat16)


def _use_triton(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """See ``reference.store_kv``. Mutates the caches."""
    if _use_triton(key):
        from pdserve.kernels.triton_store import store_kv as impl
    else:
        impl = reference.store_kv
    impl(key, value, k_cache, v_cache, slot_mapping)


def paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale,
                           workspace=None):
    """See ``reference.paged_decode_attention``. ``workspace``, reused across calls
    (the layers of a step) when given: on CUDA the Triton kernel's split-K scratch
    (``triton_decode.DecodeWorkspace``), elsewhere the reference's gather plan
    (``reference.DecodeGather``)."""
    if _use_triton(query):
        from pdserve.kernels.triton_decode import paged_decode_attention as impl

        return impl(query, k_cache, v_cache, block_tables, context_lens, scale,
                    workspace=workspace)
    gather = workspace if isinstance(workspace, reference.DecodeGather) else None
    return reference.paged_decode_attention(query, k_cache, v_cache, block_tables,
                                            context_lens, scale, gather)


def paged_prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc,
                            context_lens, scale):
    """See ``reference.paged_prefill_attention``."""
    if _use_triton(query):
        from pdserve.kernels.triton_prefill import paged_prefill_attention as impl
    else:
        impl = reference.paged_prefill_attention
    return impl(query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale)


def pack_blocks(k_cache, v_cache, block_ids, out=None):
    """See ``reference.pack_blocks``."""
    if _use_triton(k_cache):
        from pdserve.kernels.triton_blocks import pack_blocks as impl
    else:
        impl = reference.pack_blocks
    return impl(k_cache, v_cache, block_ids, out)


def unpack_blocks(buf, k_cache, v_cache, block_ids) -> None:
    """See ``reference.unpack_blocks``. Mutates the caches."""
    if _use_triton(k_cache):
        from pdserve.kernels.triton_blocks import unpack_blocks as impl
    else:
        impl = reference.unpack_blocks
    impl(buf, k_cache, v_cache, block_ids)


def copy_blocks(src_k, src_v, src_ids, dst_k, dst_v, dst_ids) -> None:
    """See ``reference.copy_blocks``. Mutates ``dst_k``/``dst_v``."""
    if _use_triton(src_k):
        from pdserve.kernels.triton_blocks import copy_blocks as impl
    else:
        impl = reference.copy_blocks
    impl(src_k, src_v, src_ids, dst_k, dst_v, dst_ids)


def copy_blocks_layers(src_layers, src_ids, dst_layers, dst_ids) -> None:
    """See ``reference.copy_blocks_layers``. Mutates the dst caches."""
    if _use_triton(src_layers[0][0]):
        from pdserve.kernels.triton_blocks import copy_blocks_layers as impl
    else:
        impl = reference.copy_blocks_layers
    impl(src_layers, src_ids, dst_layers, dst_ids)


def block_checksums(k_cache, v_cache, block_ids):
    """See ``reference.block_checksums``: [2n] int64 on the caches' device, no host sync."""
    if _use_triton(k_cache) and k_cache.is_contiguous() and v_cache.is_contiguous() \
            and (k_cache[0].numel() * k_cache.element_size()) % 4 == 0:
        from pdserve.kernels.triton_checksum import block_checksums as impl

        return impl(k_cache, v_cache, block_ids)
    return reference.block_checksums(k_cache, v_cache, block_ids)


def layer_block_checksums(kv_layers, block_ids):
    """See ``reference.layer_block_checksums``: [L, 2n] int64 on the caches' device, no host
    sync; one launch for an engine's KV cache (evenly spaced layers of one allocation)."""
    k0, v0 = kv_layers[0]
    if _use_triton(k0) and all(k.is_contiguous() and v.is_contiguous() for k, v in kv_layers) \
            and (k0[0].numel() * k0.element_size()) % 4 == 0:
        from pdserve.kernels.triton_checksum import layer_block_checksums as impl

        return impl(kv_layers, block_ids)
    return reference.layer_block_checksums(kv_layers, block_ids)


def copy_blocks_checksums(src_layers, src_ids, dst_layers, dst_ids):
    """See ``reference.copy_blocks_checksums``: [L, 2n] int64, no host sync; on CUDA one
    pass that reads each src block once (one launch for an engine's KV cache)."""
    k0, v0 = src_layers[0]
    if _use_triton(k0) and all(k.is_contiguous() and v.is_contiguous() for k, v in src_layers) \
            and (k0[0].numel() * k0.element_size()) % 4 == 0:
        from pdserve.kernels.triton_checksum import copy_blocks_checksums as impl

        return impl(src_layers, src_ids, dst_layers, dst_ids)
    return reference.copy_blocks_checksums(src_layers, src_ids, dst_layers, dst_ids)


def can_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear_small_m`` runs the Triton GEMV for these operands: CUDA, 2-D
    ``x`` of 1..``GEMV_MAX_ROWS`` rows, bf16/fp16 like ``weight``, whose rows are
    contiguous along K. Pure."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= GEMV_MAX_ROWS and x.dtype in GEMV_DTYPES
            and weight.dtype == x.dtype and weight.dim() == 2 and weight.stride(1) == 1
            and _use_triton(x))


def linear_small_m(x, weight, bias=None):
    """See ``reference.linear``: ``x @ weight^T + bias`` for decode-sized ``x``
    (``[M, K]``, M <= 8); the Triton GEMV (``triton_gemv.gemv``) when ``can_gemv``,
    else the reference. Returns a new ``[M, N]`` tensor."""
    if can_gemv(x, weight):
        from pdserve.kernels.triton_gemv import gemv

        return gemv(x, weight, bias)
    return reference.linear(x, weight, bias)


def gate_up_silu_small_m(x, weight):
    """``silu(x @ gate^T) * (x @ up^T)`` for decode-sized ``x`` (``[M, K]``, M <= 8) and
    a fused gate/up ``weight`` ``[2I, K]`` (gate rows first): one Triton GEMV with the
    activation in its epilogue (``triton_gemv.gemv_glu``) when ``can_gemv``, else the
    reference. Returns a new ``[M, I]`` tensor."""
    if can_gemv(x, weight):
        from pdserve.kernels.triton_gemv import gemv_glu

        return gemv_glu(x, weight)
    gate, up = reference.linear(x, weight).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
