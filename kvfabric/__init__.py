"""The KV plane: ships a request's KV-cache blocks from a prefill worker to a decode worker.

Layer by layer: the prefill side gathers one layer's blocks and sends them
once; the decode side lands them in the blocks it reserved, and reports the
transfer complete when every layer and the finish frame arrived.

Public names:

- ``FabricIdentity``, ``TransferPlan``, ``make_transfer_id`` (descriptors.py):
  what peers compare at the handshake; which blocks move.
- ``KVConnectorScheduler`` (connector.py): the connector's scheduler half,
  plans transfers; no torch, no transport.
- ``KVSender`` (sender.py), ``KVReceiver`` (receiver.py): the worker half,
  prefill side and decode side.
- ``get_transport``, ``Transport``, ``TRANSPORT_NAMES`` (transport.py):
  ``"tcp"`` (tcp.py, the CPU default), ``"nixl"`` (nixl.py, one-sided
  NIXL/UCX writes) and ``"nccl"`` (nccl.py, a 2-rank torch.distributed group
  per pair; gloo on CPU tensors).
- ``FabricError``, ``FabricHandshakeError``, ``FabricPeerError``,
  ``FabricTransferCancelled``, ``FabricTransportUnavailable`` (errors.py).

The wire format of the side channel is in frames.py; the decode side's
per-transfer state machine in transfers.py.
"""

from pdserve.kvfabric.connector import KVConnectorScheduler
from pdserve.kvfabric.descriptors import FabricIdentity, TransferPlan, make_transfer_id
from pdserve.kvfabric.errors import (
    FabricError,
    FabricHandshakeError,
    FabricPeerError,
    FabricTransferCancelled,
    FabricTransportUnavailable,
)
from pdserve.kvfabric.receiver import KVReceiver
from pdserve.kvfabric.sender import KVSender
from pdserve.kvfabric.transport import TRANSPORT_NAMES, Transport, get_transport

__all__ = [
    "FabricIdentity",
    "TransferPlan",
    "make_transfer_id",
    "KVConnectorScheduler",
    "KVSender",
    "KVReceiver",
    "get_transport",
    "Transport",
    "TRANSPORT_NAMES",
    "FabricError",
    "FabricHandshakeError",
    "FabricPeerError",
    "FabricTransferCancelled",
    "FabricTransportUnavailable",
]
