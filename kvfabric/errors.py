"""Errors the KV fabric raises to its callers (the prefill and decode workers).

    FabricError
      +-- FabricHandshakeError     the receiver refused us (token, identity, transport)
      +-- FabricPeerError          the peer is gone or a transfer failed on the wire
      +-- FabricTransferCancelled  the receiver no longer expects this transfer
    FabricTransportUnavailable     (an ImportError) a transport's package is missing
"""


class FabricError(Exception):
    """Base class of every error the fabric raises."""


class FabricHandshakeError(FabricError):
    """The receiver refused the connection; the message names the reason."""


class FabricPeerError(FabricError, ConnectionError):
    """The peer closed the connection, died, or a transfer failed on the wire."""


class FabricTransferCancelled(FabricError):
    """The receiver cancelled the transfer (decode-side abort, time-out, bad frame)."""


class FabricTransportUnavailable(ImportError):
    """A transport was asked for by name but its package cannot be imported."""
