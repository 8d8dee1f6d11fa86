"""Transports by name: how a layer's bytes get from prefill KV memory to decode KV memory.

The side channel (a TCP connection per sender/receiver pair, ``frames.py``)
is common to every transport: it carries the handshake, the finish and abort
frames, cancels, and tells each side when its peer dies. A transport adds
the data path for LAYER data:

    tcp   the packed layer travels on the side channel itself (``tcp.py``)
    nixl  a one-sided NIXL WRITE from registered prefill KV memory straight
          into registered decode KV memory; its notification is the LAYER
          header (``nixl.py``)
    nccl  a 2-rank torch.distributed group per pair (gloo on CPU tensors),
          rendezvous in the Welcome; one send per layer (``nccl.py``)
    cuda_ipc  one copy kernel per layer straight into the decode side's GPU
          memory, mapped by CUDA IPC (one host); every layer's digests
          travel in FINISH (``cuda_ipc.py``)

``get_transport(name)`` returns a fresh transport object; pass the same
object to several ``KVSender``s to share one NIXL agent and registration.
"""

from collections.abc import Callable

import numpy as np
import torch

from pdserve.kvfabric.descriptors import FabricIdentity, TransferPlan
from pdserve.kvfabric.digests import BlockDigests, encode_layer_aux, layer_aux_size
from pdserve.kvfabric.errors import FabricPeerError
from pdserve.kvfabric.faults import FaultInjector
from pdserve.kvfabric.frames import LAYER, Welcome, encode_header

SendFrame = Callable[[bytes, memoryview | None], None]


class LayerWire:
    """What a sender path gets from its KVSender to emit one layer.

    ``header`` seals a LAYER header with the layer's block digests (the bytes
    a tcp frame starts with, or a nixl notification); ``send`` writes a frame
    on the side channel; ``block_to_corrupt`` is the fault injector's pick
    for this layer (None: send it intact, always so unless the knob is on).
    """

    def __init__(self, key: bytes, send: SendFrame, faults: FaultInjector | None) -> None:
        self._key = key
        self.send = send
        self._faults = faults

    def header(self, plan: TransferPlan, layer_idx: int, nbytes: int,
               digests: BlockDigests) -> bytes:
        """Header + aux bytes of the LAYER frame for these digests. Pure."""
        head = encode_header(LAYER, nbytes, plan, layer_idx, layer_aux_size(plan.num_blocks))
        return head + encode_layer_aux(self._key, head, digests)

    def block_to_corrupt(self, plan: TransferPlan, layer_idx: int) -> int | None:
        return None if self._faults is None else self._faults.block_to_corrupt(plan, layer_idx)


class SenderPath:
    """The prefill side of a data path, bound to one receiver.

    ``one_sided`` paths write into the receiver's memory without the receiver
    touching the bytes; the receiver then drains them (CANCEL / CANCEL_ACK)
    before it reports a transfer failed.
    """

    one_sided = False
    digests_at_finish = False  # True: layers leave no frame; FINISH carries their digests
    # True: send_layer only enqueues work on the caller's CUDA stream, ordered after what
    # was launched there before (no host sync needed first; cuda_ipc)
    stream_ordered = False
    agent_name = ""

    def attach(self, welcome: Welcome) -> None:
        """Learn the receiver's memory from its Welcome. Mutates the path."""

    def send_layer(self, plan: TransferPlan, layer_idx: int, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, wire: LayerWire) -> int:
        """Move the plan's src blocks of one layer with their digests; returns the KV bytes moved.

        The digests are of the bytes as read from ``k_cache``/``v_cache``, one per
        block, K blocks first (``digests.py``); the header comes from ``wire.header``.
        """
        raise NotImplementedError

    def take_writes(self, transfer_id: str) -> list:
        """Remove and return the writes still in flight for a transfer."""
        return []

    def send_layers(self, plan: TransferPlan, kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
                    wire: LayerWire) -> int:
        """Every layer of the plan (KV computed earlier); returns the KV bytes moved.
        Layer by layer unless the path can do better."""
        return sum(self.send_layer(plan, i, k, v, wire) for i, (k, v) in enumerate(kv_layers))

    def finish_digests(self, plan: TransferPlan, writes: list) -> tuple[int, np.ndarray]:
        """``digests_at_finish`` paths: (algorithm, ``[num_layers, 2n]`` digests) of the
        transfer's ``writes`` after ``wait_writes``; empty when a layer was not sent."""
        raise NotImplementedError

    def wait_writes(self, writes: list) -> None:
        """Block until ``writes`` are done. Raises FabricPeerError if one failed."""

    def drain_writes(self, writes_by_transfer: dict[str, list]) -> None:
        """On close: wait for every write still in flight (a failed one is ignored, the
        path is going away) and forget them. Mutates ``writes_by_transfer``."""
        for writes in list(writes_by_transfer.values()):
            try:
                self.wait_writes(writes)
            except FabricPeerError:
                pass
        writes_by_transfer.clear()

    def close(self) -> None:
        """Release what the path holds. Idempotent."""


class ReceiverPath:
    """The decode side of a data path: what the receiver offers in its Welcome."""

    def welcome_fields(self) -> dict:
        """Extra Welcome fields (memory descriptors). Pure."""
        return {}

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        """(sender agent name, notification) pairs that arrived since the last call."""
        return []

    @property
    def has_notifications(self) -> bool:
        return False

    def close(self) -> None:
        """Release what the path holds. Idempotent."""


class Transport:
    """A named factory of data paths."""

    name = ""
    digests_at_finish = False  # its senders' FINISH frames carry every layer's digests

    def sender_path(self, identity: FabricIdentity) -> SenderPath:
        raise NotImplementedError

    def receiver_path(self, identity: FabricIdentity,
                      kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> ReceiverPath:
        raise NotImplementedError


def get_transport(name: str) -> Transport:
    """A new transport object by name (one of ``TRANSPORT_NAMES``).

    Raises ValueError for an unknown name and FabricTransportUnavailable
    (an ImportError naming the package) when its package is missing.
    """
    if name == "tcp":
        from pdserve.kvfabric.tcp import TcpTransport
        return TcpTransport()
    if name == "nixl":
        from pdserve.kvfabric.nixl import NixlTransport
        return NixlTransport()
    if name == "nccl":
        from pdserve.kvfabric.nccl import NcclTransport
        return NcclTransport()
    if name == "cuda_ipc":
        from pdserve.kvfabric.cuda_ipc import CudaIpcTransport
        return CudaIpcTransport()
    raise ValueError(f"unknown KV transport {name!r}; choose one of {list(TRANSPORT_NAMES)}")


TRANSPORT_NAMES = ("tcp", "nixl", "nccl", "cuda_ipc")


def resolve_transport(transport: str | Transport) -> Transport:
    return get_transport(transport) if isinstance(transport, str) else transport
