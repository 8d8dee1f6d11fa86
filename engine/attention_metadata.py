"""Per-step attention inputs, built by the model runner and read by every layer.

The batch's tokens are packed with decodes first (one token each), then
prefills (ragged)::

    tokens:  [ d0 d1 d2 | p0 p0 p0 p0 p1 p1 ]
              decode     prefill (query_start_loc = [0, 4, 6])
"""

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: where each token's K/V is stored
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [Nd, M] int32
    decode_context_lens: torch.Tensor  # [Nd] int32
    prefill_block_tables: torch.Tensor  # [Np, M] int32
    prefill_query_start_loc: torch.Tensor  # [Np + 1] int32, relative to first prefill token
    prefill_context_lens: torch.Tensor  # [Np] int32
    # shared by every layer of the step: on CUDA the decode kernel's split-K scratch (a
    # ``DecodeWorkspace`` sized for this batch shape), on the CPU the reference's gather
    # plan (``reference.DecodeGather``); None: each call makes its own
    decode_workspace: Any = None

    @property
    def num_prefill_seqs(self) -> int:
        return int(self.prefill_context_lens.shape[0])
