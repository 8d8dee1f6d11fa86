"""The control plane's messages and stubs (generated from ``pdserve_control.proto`` by
``control_codegen.py`` and committed), plus the worker-side client.

Public names: ``pb`` (messages), ``rpc`` (stubs/servicer base), ``ControlClient``.
"""

import grpc

from pdserve.engine import pdserve_control_pb2 as pb
from pdserve.engine import pdserve_control_pb2_grpc as rpc

__all__ = ["pb", "rpc", "ControlClient"]


class ControlClient:
    """A worker's synchronous channel to the router's control server."""

    def __init__(self, address: str, token: str, timeout_s: float = 5.0) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = rpc.ControlStub(self.channel)
        self.token = token
        self.timeout_s = timeout_s

    def register(self, info) -> str:
        """Register; returns the router's token-plane address. Raises RuntimeError with the
        router's reason when refused."""
        reply = self.stub.Register(pb.RegisterRequest(token=self.token, info=info),
                                   timeout=self.timeout_s, wait_for_ready=True)
        if not reply.ok:
            raise RuntimeError(f"router refused registration: {reply.error}")
        return reply.token_address

    def report(self, **fields):
        return self.stub.Report(pb.LoadReport(token=self.token, **fields), timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()
