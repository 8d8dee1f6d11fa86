"""Whether a list of per-layer (K, V) caches is one allocation with evenly spaced layers.

The engine's KV cache is one ``[L, 2, NB, B, Hkv, D]`` tensor whose per-layer views
sit a fixed number of bytes apart; a kernel can then visit every layer in one
launch from layer 0's pointer (``copy_blocks_layers``, ``layer_block_checksums``).
"""

import torch


def uniform_layer_stride(kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int | None:
    """Bytes from each layer's K (and V) to the next one's when every layer is a
    contiguous, same-shaped view of one allocation that far after the previous (0 for
    one layer); None otherwise. Pure."""
    k0, v0 = kv_layers[0]
    if len(kv_layers) == 1:
        return 0 if k0.is_contiguous() and v0.is_contiguous() else None
    step = kv_layers[1][0].data_ptr() - k0.data_ptr()
    if step <= 0:
        return None
    k_store, v_store = k0.untyped_storage().data_ptr(), v0.untyped_storage().data_ptr()
    for i, (k, v) in enumerate(kv_layers):
        if (k.untyped_storage().data_ptr() != k_store or v.untyped_storage().data_ptr() != v_store
                or k.data_ptr() - k0.data_ptr() != i * step
                or v.data_ptr() - v0.data_ptr() != i * step
                or not k.is_contiguous() or not v.is_contiguous()
                or k.shape != k0.shape or v.shape != k0.shape
                or k.dtype != k0.dtype or v.dtype != k0.dtype):
            return None
    return step


def spanning_view(t: torch.Tensor, num_layers: int, stride_bytes: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """A flat ``dtype`` view from contiguous ``t``'s first byte to the end of the last of
    ``num_layers`` layers ``stride_bytes`` apart: what a kernel that steps through the
    layers from ``t`` touches (the Triton interpreter copies only a tensor's extent). Pure."""
    base = t.reshape(-1).view(torch.uint8).view(dtype)
    width = base.element_size()
    span = ((num_layers - 1) * stride_bytes + t.numel() * t.element_size()) // width
    return torch.as_strided(base, (span,), (1,))
