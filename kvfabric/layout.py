"""The KV layout as the fabric sees it: one layer's K and V, each ``[NB, B, Hkv, D]``.

A block of one layer is ``FabricIdentity.bytes_per_block`` contiguous bytes
at ``k_cache.data_ptr() + block_id * bytes_per_block`` (V likewise), which
is what the nixl path addresses and what ``pack_blocks`` gathers::

    k_cache  | blk 0 | blk 1 | blk 2 | ... |     one layer, NB blocks
               <-B*Hkv*D*itemsize->
"""

import torch

from pdserve.kvfabric.descriptors import FabricIdentity


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def as_bytes(t: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor's memory (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def check_kv_layers(kv_layers, identity: FabricIdentity) -> int:
    """The cache's num_blocks; raises ValueError if it does not match ``identity``."""
    if len(kv_layers) != identity.num_layers:
        raise ValueError(f"{len(kv_layers)} KV layers, identity says {identity.num_layers}")
    want = (identity.block_size, identity.num_kv_heads, identity.head_dim)
    num_blocks = kv_layers[0][0].shape[0]
    for i, pair in enumerate(kv_layers):
        for t in pair:
            if tuple(t.shape) != (num_blocks,) + want or not t.is_contiguous():
                raise ValueError(f"layer {i}: KV tensor {tuple(t.shape)} is not a contiguous "
                                 f"[{num_blocks}, {want[0]}, {want[1]}, {want[2]}]")
            if str(t.dtype).removeprefix("torch.") != identity.dtype:
                raise ValueError(f"layer {i}: dtype {t.dtype}, identity says {identity.dtype}")
    return num_blocks
