"""The control plane's messages and stubs, compiled from ``pdserve_control.proto`` at
import time by grpcio-tools (so the generated code always matches the installed
grpcio/protobuf), plus the worker-side client.

Public names: ``pb`` (messages), ``rpc`` (stubs/servicer base), ``ControlClient``.
"""

import functools
import sys
from pathlib import Path

import grpc

_PROTO = "pdserve_control.proto"


@functools.cache
def _compile():
    here = str(Path(__file__).resolve().parent)
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        return grpc.protos_and_services(_PROTO)
    finally:
        if added:
            sys.path.remove(here)


pb, rpc = _compile()


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
