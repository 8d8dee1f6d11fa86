"""The KV cache tensors: one (K, V) pair per layer, each [num_blocks, block_size, Hkv, D].

Allocated once as a single tensor ``[L, 2, NB, B, Hkv, D]`` so that the fabric
can register one contiguous region; per-layer views are what kernels see.
"""

from dataclasses import dataclass

import torch

from pdserve.engine.config import ModelConfig


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block_per_layer(self) -> int:
        """K and V of one block in one layer."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block_per_layer * self.num_layers // self.block_size


def blocks_for_budget(cfg: ModelConfig, block_size: int, dtype: torch.dtype,
                      budget_bytes: int) -> int:
    per_block = 2 * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize * cfg.num_layers
    return max(1, budget_bytes // per_block)


class KVCache:
    def __init__(self, spec: KVCacheSpec, device: torch.device) -> None:
        self.spec = spec
        self.storage = torch.zeros(
            (spec.num_layers, 2, spec.num_blocks, spec.block_size, spec.num_kv_heads,
             spec.head_dim), dtype=spec.dtype, device=device)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (self.storage[i, 0], self.storage[i, 1]) for i in range(spec.num_layers)]
