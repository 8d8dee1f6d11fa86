"""Decode worker: local prefill or a hand-off from a prefill peer, then decoding.

Hand-off of one request (``GenerateRequest`` with ``prefill_worker`` set)::

    reserve blocks (prefix hits kept) -> receiver.expect(plan) -> PrefillRequest to P
    ... P pushes KV layer by layer, then a finish frame carrying PrefillDone ...
    on_complete (fabric thread) -> loop: engine.complete_transfer -> first token out
    on_error (peer dead, time-out, bad KV) or Reroute from the router
                                 -> free the reserved blocks, prefill here instead
                                    (the next attempt; late frames of the old one
                                    are refused by the receiver)
    abort / deadline             -> engine.abort (blocks freed) + Abort to P

While a hand-off is expected, its lease at P is renewed (``LeaseRenew`` every
third of ``kv_lease_s``, from the loop and from inside long steps); a worker
that stops (SIGSTOP, a stalled loop) lets P free the blocks it holds for it.
"""

import logging
import time

from pdserve.engine import messages as m
from pdserve.engine.block_hash import HASH_ALGORITHM
from pdserve.engine.worker_runtime import WorkerRuntime, WorkerSpec, delta_to_wire
from pdserve.kvfabric import FabricIdentity, KVConnectorScheduler, KVReceiver, make_transfer_id

log = logging.getLogger("pdserve.decode")


class DecodeWorker(WorkerRuntime):
    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        e = self.engine
        self.identity = FabricIdentity.from_kv_spec(spec.engine.model, e.kv_spec,
                                                    e.config.hash_seed, HASH_ALGORITHM)
        self.receiver = KVReceiver(e.kv_cache.layers, self.identity, spec.token,
                                   transport=spec.transport, host=spec.host, port=spec.kv_port)
        self.planner = KVConnectorScheduler(e.model_config.num_layers)
        self.handoffs: dict[str, tuple[str, m.GenerateRequest]] = {}  # id -> (prefill, msg)
        self.fallbacks = 0  # hand-offs that failed and were prefilled here instead
        self.retry: list[m.GenerateRequest] = []  # hand-offs waiting for free blocks
        self.next_renewal = 0.0  # monotonic time of the next LeaseRenew round

    def kv_address(self) -> str:
        """Where prefill peers send KV: the advertised address, else the receiver's."""
        return self.spec.kv_advertise or self.receiver.address

    def housekeeping(self) -> None:
        self._renew_leases()

    def tick(self, layer: int | None = None) -> None:
        super().tick(layer)
        self._renew_leases()

    def _renew_leases(self) -> None:
        """Every third of a lease, tell each prefill peer which hand-offs still need it."""
        now = time.monotonic()
        if now < self.next_renewal or not self.handoffs:
            return
        self.next_renewal = now + self.spec.kv_lease_s / 3
        by_peer: dict[str, list[str]] = {}
        for rid, (prefill, _) in self.handoffs.items():
            by_peer.setdefault(prefill, []).append(rid)
        for prefill, rids in by_peer.items():
            self.send_to(prefill, m.LeaseRenew(self.spec.token, self.request_address, rids))

    def pending_transfers(self) -> int:
        return self.receiver.num_pending

    def kv_bytes(self) -> tuple[int, int]:
        return 0, self.receiver.bytes_received

    def handle(self, msg) -> None:
        if isinstance(msg, m.GenerateRequest):
            self._generate(msg)
        elif isinstance(msg, m.Abort):
            self.abort(msg.request_id, "client")
        elif isinstance(msg, m.Reroute):
            if msg.request_id in self.handoffs:
                self.receiver.cancel(make_transfer_id(msg.request_id, 0),
                                     f"rerouted: {msg.reason}")
        elif isinstance(msg, m.Stall) and self.spec.engine.extra.get("fault_injection"):
            time.sleep(msg.seconds)
        else:
            log.warning("decode worker ignores %s", type(msg).__name__)

    def _reject(self, request_id: str, error: str) -> None:
        self.publish([m.TokenDelta(request_id=request_id, token_ids=[], text="", finished=True,
                                   finish_reason="abort", error=error)])

    def _generate(self, msg: m.GenerateRequest) -> None:
        try:
            params = msg.sampling.to_params()
            if msg.prefill_worker is None:
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, params)
            else:
                self._handoff(msg, params)
        except ValueError as exc:
            self._reject(msg.request_id, f"invalid request: {exc}")
            return
        if msg.deadline is not None:
            self.deadlines[msg.request_id] = msg.deadline

    def _handoff(self, msg: m.GenerateRequest, params) -> None:
        e = self.engine
        req = e.reserve_for_transfer(msg.request_id, msg.prompt_token_ids, params)
        if req is None:  # pool short: prefill here instead (the scheduler will wait)
            e.add_request(msg.request_id, msg.prompt_token_ids, params)
            return
        cached_blocks = req.num_computed_tokens // e.config.block_size
        plan = self.planner.plan(msg.request_id, None, req.block_ids, cached_blocks)
        rid = msg.request_id
        # The transfer includes the prefill peer's queueing: bound it by the transfer
        # time-out and by the request's own deadline (a dead peer is caught by its
        # connection, a peer cut off by the network by this time-out).
        timeout_s = self.spec.transfer_timeout_s
        if msg.deadline is not None:
            timeout_s = min(timeout_s, max(1.0, msg.deadline - time.time()))
        self.receiver.expect(
            plan,
            on_complete=lambda p, payload: self.local.put(lambda: self._landed(rid, payload)),
            on_error=lambda p, reason: self.local.put(lambda: self._failed(rid, reason)),
            timeout_s=timeout_s,
            on_timing=lambda p, nbytes, wire_s, src=msg.prefill_worker:
                self.kv_received.record(src, nbytes, wire_s))
        self.handoffs[rid] = (msg.prefill_worker, msg)
        self.send_to(msg.prefill_worker, m.PrefillRequest(
            token=self.spec.token, request_id=rid, prompt_token_ids=msg.prompt_token_ids,
            sampling=msg.sampling, decode_worker=self.request_address,
            kv_address=self.kv_address(), first_block=cached_blocks,
            dst_block_ids=list(plan.dst_block_ids), deadline=msg.deadline))

    def _landed(self, request_id: str, payload: bytes) -> None:
        if self.handoffs.pop(request_id, None) is None:
            return  # aborted or rerouted meanwhile; blocks already freed
        try:
            done = m.decode(payload)
            assert isinstance(done, m.PrefillDone) and done.request_id == request_id
        except Exception as exc:
            self._failed(request_id, f"bad completion payload: {exc}")
            return
        if done.error is not None or done.first_token_id is None:
            self._failed(request_id, done.error or "prefill failed")
            return
        delta = self.engine.complete_transfer(request_id, done.first_token_id)
        wire = delta_to_wire(delta)
        if done.logprob is not None:
            wire = m.TokenDelta(**{**{f: getattr(wire, f) for f in wire.__struct_fields__},
                                   "logprobs": [done.logprob]})
        if done.num_cached_tokens:
            req = self.engine.scheduler.requests.get(request_id)
            if req is not None:
                req.num_cached_tokens = max(req.num_cached_tokens, done.num_cached_tokens)
        if wire.finished:
            self.deadlines.pop(request_id, None)
        self.publish([wire])

    def _failed(self, request_id: str, reason: str) -> None:
        """The hand-off failed: route around the prefill peer by prefilling here."""
        entry = self.handoffs.pop(request_id, None)
        if entry is None:
            return  # aborted by the client meanwhile: nothing to do
        prefill, msg = entry
        self.send_to(prefill, m.Abort(self.spec.token, request_id))
        self.engine.abort(request_id)  # frees the reserved blocks
        log.warning("hand-off of %s failed (%s); prefilling locally", request_id, reason)
        self.fallbacks += 1
        try:
            self.engine.add_request(request_id, msg.prompt_token_ids, msg.sampling.to_params())
        except ValueError as exc:
            self.deadlines.pop(request_id, None)
            self._reject(request_id, f"KV transfer failed ({reason}); local prefill: {exc}")

    def abort(self, request_id: str, reason: str) -> None:
        entry = self.handoffs.pop(request_id, None)
        if entry is not None:
            self.receiver.cancel(make_transfer_id(request_id, 0), reason)
            self.send_to(entry[0], m.Abort(self.spec.token, request_id))
        super().abort(request_id, reason)
