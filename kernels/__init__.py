"""Attention and KV-movement kernels over the paged KV cache.

Imports only torch and triton; knows nothing of requests. Every op has a
plain-torch reference (``reference.py``) and, on CUDA, a Triton version
(``triton_*.py``). ``ops.py`` picks one by device.

KV layout (one layer): ``k_cache`` and ``v_cache`` are each
``[num_blocks, block_size, num_kv_heads, head_dim]``. Token ``t`` of a
sequence lives in block ``block_table[t // block_size]`` at offset
``t % block_size``; its *slot* is ``block_id * block_size + offset``.

Public names: ``store_kv``, ``paged_decode_attention``,
``paged_prefill_attention``, ``pack_blocks``, ``unpack_blocks``, ``copy_blocks``.
"""

from pdserve.kernels.ops import (
    copy_blocks,
    pack_blocks,
    paged_decode_attention,
    paged_prefill_attention,
    store_kv,
    unpack_blocks,
)

__all__ = [
    "store_kv",
    "paged_decode_attention",
    "paged_prefill_attention",
    "pack_blocks",
    "unpack_blocks",
    "copy_blocks",
]
