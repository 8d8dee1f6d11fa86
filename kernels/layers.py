"""Whether a list of per-layer (K, V) caches is one allocation with evenly spaced layers.

The engine's KV cache is one ``[L, 2, NB, B, Hkv, D]`` tensor whose per-layer views
sit a fixed number of bytes apart; a kernel can then visit every layer in one
launch from layer 0's pointer (``copy_blocks_layers``, ``layer_block_checksums``).
"""

import torch


def uniform_layer_stride(kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int | None:
    """Bytes from each layer's K (and V) to the next one's when every layer is a
    contiguous, same-shaped view of layer 0's allocation that far after the previous
    (0 for one layer); None otherwise. Pure; cheap (integer checks per layer)."""
    k0, v0 = kv_layers[0]
    if not (k0.is_contiguous() and v0.is_contiguous()) or v0.shape != k0.shape \
            or v0.dtype != k0.dtype:
        return None
    if len(kv_layers) == 1:
        return 0
    kp = [k.data_ptr() for k, _ in kv_layers]
    vp = [v.data_ptr() for _, v in kv_layers]
    step = kp[1] - kp[0]
    if step <= 0 or any(kp[i] - kp[0] != i * step or vp[i] - vp[0] != i * step
                        for i in range(len(kp))):
        return None
    store = k0.untyped_storage()
    lo, hi = store.data_ptr(), store.data_ptr() + store.nbytes()
    if v0.untyped_storage().data_ptr() != lo or min(kp[0], vp[0]) < lo \
            or max(kp[-1], vp[-1]) + k0.nbytes > hi:
        return None  # the spacing must stay inside one allocation
    same = all(k.shape == k0.shape and v.shape == k0.shape and k.dtype == k0.dtype
               and v.dtype == k0.dtype and k.is_contiguous() and v.is_contiguous()
               for k, v in kv_layers)
    return step if same else None


def spanning_view(t: torch.Tensor, num_layers: int, stride_bytes: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """A flat ``dtype`` view from contiguous ``t``'s first byte to the end of the last of
    ``num_layers`` layers ``stride_bytes`` apart: what a kernel that steps through the
    layers from ``t`` touches (the Triton interpreter copies only a tensor's extent). Pure."""
    base = t.reshape(-1).view(torch.uint8).view(dtype)
    width = base.element_size()
    span = ((num_layers - 1) * stride_bytes + t.numel() * t.element_size()) // width
    return torch.as_strided(base, (span,), (1,))
