"""The router's gRPC control server: workers register and report load here."""

import hmac

import grpc
from google.protobuf.json_format import MessageToDict

from pdserve.engine.control_plane import pb, rpc
from pdserve.router.registry import Registry


class ControlServicer(rpc.ControlServicer):
    def __init__(self, registry: Registry, token: str, token_address: str) -> None:
        self.registry = registry
        self.token = token
        self.token_address = token_address
        self.drain: set[str] = set()
        self.refusals: list[str] = []  # reasons, for logs and tests

    def _authentic(self, token: str) -> bool:
        return hmac.compare_digest(token, self.token)

    async def Register(self, request, context):
        if not self._authentic(request.token):
            reason = f"cluster token mismatch (worker {request.info.worker_id})"
            self.refusals.append(reason)
            print(f"router: refused worker {request.info.worker_id}: {reason}", flush=True)
            return pb.RegisterReply(ok=False, error=reason)
        reason = self.registry.register(request.info)
        if reason is not None:
            self.refusals.append(reason)
            print(f"router: refused worker {request.info.worker_id}: {reason}", flush=True)
            return pb.RegisterReply(ok=False, error=reason)
        print(f"router: registered {request.info.role} worker {request.info.worker_id} "
              f"({request.info.total_blocks} blocks)", flush=True)
        return pb.RegisterReply(ok=True, token_address=self.token_address)

    async def Report(self, request, context):
        if not self._authentic(request.token):
            return pb.ReportReply(ok=False, error="cluster token mismatch")
        fields = MessageToDict(request, preserving_proto_field_name=True,
                               always_print_fields_with_no_presence=True)
        fields.pop("token", None)
        for k in ("kv_bytes_sent", "kv_bytes_received", "steps", "prefill_tokens",
                  "prefill_requests", "prefix_cached_tokens"):
            fields[k] = int(fields.get(k, 0))  # uint64 arrives as a JSON string
        fields["kv_received"] = [
            {"peer": r.get("peer", ""), "num_transfers": int(r.get("num_transfers", 0)),
             "bytes": int(r.get("bytes", 0)), "seconds": float(r.get("seconds", 0.0))}
            for r in fields.get("kv_received", [])]
        ok = self.registry.report(request.worker_id, fields)
        return pb.ReportReply(ok=ok, drain=request.worker_id in self.drain,
                              error="" if ok else "unknown worker: register first")

    async def Drain(self, request, context):
        if not self._authentic(request.token):
            return pb.DrainReply(ok=False, error="cluster token mismatch")
        self.drain.add(request.worker_id)
        return pb.DrainReply(ok=True)


async def start_control_server(servicer: ControlServicer, host: str, port: int):
    """Start the aio gRPC server; returns (server, bound address)."""
    server = grpc.aio.server()
    rpc.add_ControlServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, f"{host}:{bound}"
