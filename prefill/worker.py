"""Prefill worker: prefill-only requests whose KV is pushed layer by layer.

In the step where a request's last prompt chunk runs, the layer hook sends
layer i of all of its blocks the decode side lacks as soon as layer i is
computed (blocks of earlier chunks are complete in every layer already).
After the step the sampled first token goes in the finish frame, and the
request's blocks are released (they stay in the prefix cache). On CUDA the
sends run on a push thread and side stream (``layer_push.py``), so layer i
moves while layer i+1 computes; the step flushes them before the finish.

A job holds its blocks for the decode peer under a lease (``engine/lease.py``)
that the peer renews with ``LeaseRenew``; a lapsed job is aborted (blocks
freed, the transfer failed), and a send that the peer does not take for a
whole lease ends the connection, so a stopped decode worker cannot hang us.
"""

import logging
import time

from pdserve.engine import messages as m
from pdserve.engine.block_hash import HASH_ALGORITHM
from pdserve.engine.lease import LeaseTable
from pdserve.engine.worker_runtime import WorkerRuntime, WorkerSpec
from pdserve.kvfabric import (
    FabricError,
    FabricIdentity,
    FabricPeerError,
    KVConnectorScheduler,
    KVSender,
    TransferPlan,
)
from pdserve.prefill.layer_push import LayerPusher

log = logging.getLogger("pdserve.prefill")
RECONNECT_BACKOFF_S = 2.0


class PrefillWorker(WorkerRuntime):
    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        e = self.engine
        self.identity = FabricIdentity.from_kv_spec(spec.engine.model, e.kv_spec,
                                                    e.config.hash_seed, HASH_ALGORITHM)
        self.planner = KVConnectorScheduler(e.model_config.num_layers)
        self.senders: dict[str, KVSender] = {}  # decode kv address -> sender
        self.jobs: dict[str, m.PrefillRequest] = {}
        self.plans: dict[str, TransferPlan] = {}  # jobs whose layers are being sent
        self.broken: dict[str, str] = {}  # request id -> why its push failed this step
        self.pusher = LayerPusher(e.device)
        self.leases = LeaseTable(spec.kv_lease_s)  # jobs' holds, renewed by their peers
        self.dead_until: dict[str, float] = {}  # kv address -> no reconnect before (monotonic)
        self.closed_bytes_sent = 0  # by senders closed since (kv_bytes stays cumulative)

    def kv_bytes(self) -> tuple[int, int]:
        return self.closed_bytes_sent + sum(s.bytes_sent for s in self.senders.values()), 0

    def _sender(self, address: str) -> KVSender:
        """The live sender to ``address``, connecting if needed. Raises FabricError; a peer
        that just failed to connect is not retried for ``RECONNECT_BACKOFF_S`` (one step
        with many jobs for a stopped peer must not wait out a handshake per job)."""
        sender = self.senders.get(address)
        if sender is not None and sender.is_alive:
            return sender
        if sender is not None:
            sender.close()
            self.closed_bytes_sent += sender.bytes_sent
            del self.senders[address]
        now = time.monotonic()
        if self.dead_until.get(address, 0.0) > now:
            raise FabricPeerError(f"KV receiver {address} is unreachable (retried after "
                                  f"{RECONNECT_BACKOFF_S:g} s)")
        extra = self.spec.engine.extra
        lease_s = self.spec.kv_lease_s
        try:
            sender = KVSender(address, self.spec.token, self.identity,
                              transport=self.spec.transport,
                              connect_timeout_s=min(5.0, lease_s),
                              fault_rate=extra.get("kv_fault_rate"),
                              fault_seed=extra.get("kv_fault_seed"),
                              send_timeout_s=lease_s)
        except FabricError:
            self.dead_until[address] = now + RECONNECT_BACKOFF_S
            raise
        self.dead_until.pop(address, None)
        self.senders[address] = sender
        return sender

    def handle(self, msg) -> None:
        if isinstance(msg, m.PrefillRequest):
            try:
                self._sender(msg.kv_address)  # connect + handshake before any compute
                self.engine.add_request(msg.request_id, msg.prompt_token_ids,
                                        msg.sampling.to_params(), prefill_only=True)
            except (ValueError, FabricError) as exc:
                self._fail_job(msg, str(exc))
                return
            self.jobs[msg.request_id] = msg
            self.leases.grant(msg.request_id, msg.decode_worker, time.monotonic())
            if msg.deadline is not None:
                self.deadlines[msg.request_id] = msg.deadline
        elif isinstance(msg, m.LeaseRenew):
            renewed = self.leases.renew(msg.decode_worker, msg.request_ids, time.monotonic())
            if renewed < len(msg.request_ids):  # lapsed or already finished here
                log.debug("ignored %d late lease renewal(s) from %s",
                          len(msg.request_ids) - renewed, msg.decode_worker)
        elif isinstance(msg, m.Abort):
            self.abort(msg.request_id, "aborted by the decode side")
        elif isinstance(msg, m.Stall) and self.spec.engine.extra.get("fault_injection"):
            time.sleep(msg.seconds)
        else:
            log.warning("prefill worker ignores %s", type(msg).__name__)

    def _fail_job(self, job: m.PrefillRequest, error: str) -> None:
        """Tell the decode side the prefill failed (over the fabric if possible)."""
        self.jobs.pop(job.request_id, None)
        self.leases.release(job.request_id)
        plan = self.plans.pop(job.request_id, None)
        try:
            sender = self.senders.get(job.kv_address)
            if sender is not None and plan is not None:
                self._note_fault(sender, plan)
            if sender is not None:
                if plan is None:
                    plan = self._plan_without_src(job)
                sender.abort(plan, error)
        except FabricError:
            pass  # the decode side's own time-out will fail the transfer
        log.warning("prefill of %s failed: %s", job.request_id, error)

    def _note_fault(self, sender: KVSender, plan: TransferPlan) -> None:
        """Log a transfer the fault knob corrupted (tests match it to the decode side's
        detection). Only when the knob is on."""
        if self.spec.engine.extra.get("kv_fault_rate"):
            corrupted = sender.faults_injected.get(plan.transfer_id)
            if corrupted is not None:
                log.warning("fault injection corrupted the KV of %s (layer %d, block %d)",
                            plan.request_id, *corrupted)

    def _plan_without_src(self, job: m.PrefillRequest) -> TransferPlan:
        n = len(job.dst_block_ids)
        return self.planner.plan_from_suffix(job.request_id, list(range(job.first_block + n)),
                                             job.first_block, job.dst_block_ids)

    def _layer_hook(self, layer: int) -> None:
        self.tick(layer)
        sched = self.engine.current_schedule
        for s in sched.scheduled:
            req = s.request
            job = self.jobs.get(req.request_id)
            if job is None or req.request_id in self.broken:
                continue
            if req.num_computed_tokens + s.num_new_tokens != req.num_tokens:
                continue  # not its last prompt chunk yet
            plan = self.plans.get(req.request_id)
            try:
                if plan is None:
                    plan = self.planner.plan_from_suffix(req.request_id, req.block_ids,
                                                         job.first_block, job.dst_block_ids)
                    self.plans[req.request_id] = plan
                k, v = self.engine.kv_cache.layers[layer]
                sender = self._sender(job.kv_address)
                self.pusher.push(req.request_id, lambda s=sender, p=plan, i=layer, k=k, v=v:
                                 s.send_layer(p, i, k, v), sender.stream_ordered)
            except (ValueError, FabricError) as exc:
                self.broken[req.request_id] = str(exc)

    def step(self) -> list[m.TokenDelta]:
        e = self.engine
        deltas = e.step(self._layer_hook)
        self.broken.update(self.pusher.flush())
        by_id = {d.request_id: d for d in deltas}
        for rid, why in list(self.broken.items()):
            job = self.jobs.get(rid)
            e.abort(rid)
            for req in list(e.finished_prefills):
                if req.request_id == rid:
                    e.release_prefill(req)
            if job is not None:
                self._fail_job(job, why)
        self.broken.clear()
        for req in list(e.finished_prefills):
            rid = req.request_id
            job = self.jobs.pop(rid, None)
            plan = self.plans.pop(rid, None)
            self.deadlines.pop(rid, None)
            self.leases.release(rid)
            if job is not None and plan is not None:
                d = by_id.get(rid)
                lp = None
                if d is not None and d.new_logprobs:
                    x = d.new_logprobs[0]
                    lp = [x.token_id, x.logprob, [list(t) for t in x.top]]
                done = m.PrefillDone(self.spec.token, rid, req.output_token_ids[0], lp,
                                     req.num_cached_tokens)
                try:
                    sender = self._sender(job.kv_address)
                    self._note_fault(sender, plan)
                    sender.finish(plan, m.encode(done))
                except FabricError as exc:
                    log.warning("finish of %s failed: %s", rid, exc)
            e.release_prefill(req)
        return []  # the decode side streams the tokens

    def housekeeping(self) -> None:
        """Abort the jobs whose decode peer stopped renewing their lease (blocks freed)."""
        for rid, lease in self.leases.lapsed(time.monotonic()):
            self.abort(rid, self._lapse_reason(lease.peer))

    def _lapse_reason(self, peer: str) -> str:
        return f"lease lapsed: decode worker {peer} did not renew it within " \
               f"{self.leases.lease_s:g} s"

    def abort(self, request_id: str, reason: str) -> None:
        self.deadlines.pop(request_id, None)
        self.engine.abort(request_id)
        for req in list(self.engine.finished_prefills):
            if req.request_id == request_id:
                self.engine.release_prefill(req)
        job = self.jobs.get(request_id)
        if job is not None:
            self._fail_job(job, reason)
