"""Fault injection for tests: corrupt a random fraction of transfers on purpose.

Off by default. ``KVSender(..., fault_rate=0.5, fault_seed=1)``, or the
environment (``PDSERVE_FABRIC_FAULT_RATE``, ``PDSERVE_FABRIC_FAULT_SEED``)
when the caller passes no rate, turns it on: each transfer with blocks is
picked with probability ``fault_rate``; for a picked one, one block of one
layer is corrupted as it leaves (a byte of the sender's private packed copy
is flipped after its digest was taken; on nixl, whose writes read the KV
cache itself, the block's digest is flipped instead). The receiver's digest
check then fails exactly those transfers. ``injected`` records what was
corrupted, so tests can count the failures they must see.
"""

import os
import random
import threading
from collections import OrderedDict

import torch

from pdserve.kvfabric.descriptors import TransferPlan
from pdserve.kvfabric.digests import BlockDigests

ENV_FAULT_RATE = "PDSERVE_FABRIC_FAULT_RATE"
ENV_FAULT_SEED = "PDSERVE_FABRIC_FAULT_SEED"
MAX_REMEMBERED = 4096


class FaultInjector:
    """Decides, once per transfer, whether and where to corrupt it. Thread-safe."""

    def __init__(self, rate: float, seed: int | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault_rate must be within 0..1, got {rate}")
        self.rate = rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._plans: OrderedDict[str, tuple[int, int] | None] = OrderedDict()
        self.injected: OrderedDict[str, tuple[int, int]] = OrderedDict()  # tid -> (layer, block)

    @classmethod
    def from_knob(cls, rate: float | None, seed: int | None) -> "FaultInjector | None":
        """The injector for a sender's knob (``rate=None``: the environment's); None when off."""
        if rate is None:
            rate = float(os.environ.get(ENV_FAULT_RATE, "0") or 0)
            if seed is None and os.environ.get(ENV_FAULT_SEED):
                seed = int(os.environ[ENV_FAULT_SEED])
        return cls(rate, seed) if rate > 0 else None

    def block_to_corrupt(self, plan: TransferPlan, layer_idx: int) -> int | None:
        """Packed block index (K blocks, then V) to corrupt in this layer, or None.

        Records the injection in ``injected``: call only when the layer is sent.
        """
        if plan.num_blocks == 0:
            return None
        with self._lock:
            if plan.transfer_id not in self._plans:
                pick = None
                if self._rng.random() < self.rate:
                    pick = (self._rng.randrange(plan.num_layers),
                            self._rng.randrange(2 * plan.num_blocks))
                self._plans[plan.transfer_id] = pick
                _trim(self._plans)
            pick = self._plans[plan.transfer_id]
            if pick is None or pick[0] != layer_idx:
                return None
            self.injected[plan.transfer_id] = pick
            _trim(self.injected)
            return pick[1]


def _trim(d: OrderedDict) -> None:
    while len(d) > MAX_REMEMBERED:
        d.popitem(last=False)


def flip_byte(rows: torch.Tensor, index: int) -> None:
    """Flip bits of one byte in row ``index`` of ``[m, bytes_per_block]`` uint8. Mutates rows."""
    rows[index, rows.shape[1] // 2] ^= 0x5A


def flip_digest(digests: BlockDigests, index: int) -> BlockDigests:
    """The same digests with entry ``index`` changed. Pure."""
    values = list(digests.values)
    values[index] ^= 0x1
    return BlockDigests(digests.algo, tuple(values))
