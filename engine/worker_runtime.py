"""What a prefill worker and a decode worker share: the engine loop, its sockets, and
the heartbeat to the router.

    inbox (ZMQ PULL, bound) --msgspec--> handle(msg)      [loop thread]
    local events (fabric callbacks)  ---> handle_local()   [loop thread]
    engine.step() -> TokenBatch ---------> router (ZMQ PUSH)
    heartbeat thread --gRPC Report------> router control server

Only the loop thread touches the engine. Messages without the cluster token are
dropped. ``loop_age_s`` in the heartbeat tells the router whether the loop is
still going round (health that tells the truth).
"""

import hmac
import logging
import queue
import threading
import time
from dataclasses import dataclass

import msgspec
import zmq

from pdserve.engine import messages as m
from pdserve.engine.block_hash import HASH_ALGORITHM
from pdserve.engine.config import EngineConfig
from pdserve.engine.control_plane import ControlClient, pb
from pdserve.engine.kv_events import KVEventPublisher
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.outputs import StepDelta

log = logging.getLogger("pdserve.worker")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, passed to it as JSON by the launcher."""

    worker_id: str
    role: str  # "prefill" | "decode" | "colocated"
    control_address: str  # router's gRPC endpoint
    token: str  # the cluster token
    engine: EngineConfig
    host: str = "127.0.0.1"
    transport: str = "tcp"
    heartbeat_s: float = 0.5
    transfer_timeout_s: float = 120.0  # a hand-off's KV must land within this (decode side)
    kv_lease_s: float = 5.0  # prefill side: a hold its decode peer stops renewing lapses
    kv_port: int = 0  # decode side: the KV receiver's port (0 = any free port)
    kv_advertise: str = ""  # decode side: "host:port" prefill peers dial (a proxy, a NAT)


def delta_to_wire(d: StepDelta, error: str | None = None) -> m.TokenDelta:
    lps = None
    if d.new_logprobs:
        lps = [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in d.new_logprobs]
    return m.TokenDelta(
        request_id=d.request_id, token_ids=list(d.new_token_ids), text=d.new_text,
        finished=d.finished, finish_reason=d.finish_reason, stop_reason=d.stop_reason,
        logprobs=lps, num_prompt_tokens=d.num_prompt_tokens,
        num_output_tokens=d.num_output_tokens, num_cached_tokens=d.num_cached_tokens,
        error=error)


class StepStats:
    """Cumulative step counters for the router's cost model (``LoadReport`` fields).
    Written by the loop thread, read by the heartbeat thread (ints and floats)."""

    def __init__(self) -> None:
        self.prefill_steps = self.prefill_tokens = 0
        self.prefill_attn_tokens = self.prefill_seconds = 0.0
        self.decode_steps = self.decode_seqs = self.decode_ctx_tokens = 0
        self.decode_seconds = 0.0
        self.prefill_requests = self.prefix_cached_tokens = 0

    def add(self, schedule, seconds: float) -> None:
        """Account one step (its ``SchedulerOutput``, read after the step ran). Mutates
        the counters; a request whose first tokens ran in this step counts as a started
        prefill, with its prefix-cache hit (``num_cached_tokens``)."""
        for s in schedule.scheduled:
            req = s.request
            if req.num_computed_total == s.num_new_tokens and \
                    req.num_computed_tokens <= req.num_prompt_tokens:
                self.prefill_requests += 1
                self.prefix_cached_tokens += req.num_cached_tokens
        before = [(s.num_new_tokens, s.request.num_computed_tokens - s.num_new_tokens,
                   s.request.num_prompt_tokens) for s in schedule.scheduled]
        if any(done < prompt for _, done, prompt in before):
            self.prefill_steps += 1
            self.prefill_tokens += sum(n for n, _, _ in before)
            self.prefill_attn_tokens += sum(n * (done + n / 2) for n, done, _ in before)
            self.prefill_seconds += seconds
        else:
            self.decode_steps += 1
            self.decode_seqs += len(before)
            self.decode_ctx_tokens += sum(done + n for n, done, _ in before)
            self.decode_seconds += seconds

    def fields(self) -> dict:
        return {k: getattr(self, k) for k in (
            "prefill_steps", "prefill_tokens", "prefill_attn_tokens", "prefill_seconds",
            "decode_steps", "decode_seqs", "decode_ctx_tokens", "decode_seconds",
            "prefill_requests", "prefix_cached_tokens")}


class KVPeerTotals:
    """Cumulative KV transfers this worker completed, per sending peer (``LoadReport``
    ``kv_received``). ``record`` runs on the fabric's threads, ``fields`` on the
    heartbeat thread: both take the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, tuple[int, int, float]] = {}  # peer -> (n, bytes, seconds)

    def record(self, peer: str, nbytes: int, seconds: float) -> None:
        """Add one completed transfer from ``peer``. Mutates the totals."""
        with self._lock:
            n, b, s = self._totals.get(peer, (0, 0, 0.0))
            self._totals[peer] = (n + 1, b + nbytes, s + seconds)

    def fields(self) -> dict:
        """``kv_received`` and ``kv_seconds`` for the load report. Pure."""
        with self._lock:
            rows = [pb.KVPeerTotals(peer=p, num_transfers=n, bytes=b, seconds=s)
                    for p, (n, b, s) in sorted(self._totals.items())]
        return {"kv_received": rows, "kv_seconds": sum(r.seconds for r in rows)}


class WorkerRuntime:
    """Base class: subclasses implement ``handle`` (token-plane messages) and may
    override ``step`` and ``handle_local``."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.engine = LLMEngine(spec.engine)
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        port = self.inbox.bind_to_random_port(f"tcp://{spec.host}")
        self.request_address = f"tcp://{spec.host}:{port}"
        self.local: queue.Queue = queue.Queue()  # callables run on the loop thread
        self._peers: dict[str, zmq.Socket] = {}
        self._stop = threading.Event()
        self.loop_time = time.monotonic()
        self.deadlines: dict[str, float] = {}
        self.control = ControlClient(spec.control_address, spec.token)
        self.out: zmq.Socket | None = None
        self.kv_events = KVEventPublisher(self.ctx, spec.worker_id, spec.token, spec.host)
        self.step_stats = StepStats()
        self.kv_received = KVPeerTotals()  # decode side: filled by the fabric's callbacks

    # ---- registration and heartbeat ---------------------------------------------------
    def kv_address(self) -> str:
        return ""

    def pending_transfers(self) -> int:
        return 0

    def kv_bytes(self) -> tuple[int, int]:
        """(bytes sent, bytes received) over the KV fabric so far."""
        return 0, 0

    def register(self) -> None:
        e = self.engine
        info = pb.WorkerInfo(
            worker_id=self.spec.worker_id, role=self.spec.role,
            request_address=self.request_address, kv_address=self.kv_address(),
            model=self.spec.engine.model, block_size=e.config.block_size,
            dtype=str(e.dtype).removeprefix("torch."), hash_seed=e.config.hash_seed,
            hash_algorithm=HASH_ALGORITHM, total_blocks=e.pool.num_blocks,
            transport=self.spec.transport, max_model_len=e.max_model_len,
            pid=__import__("os").getpid(), events_address=self.kv_events.address,
            snapshot_address=self.kv_events.snapshot_address)
        token_address = self.control.register(info)
        self.out = self.ctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.LINGER, 0)
        self.out.connect(token_address)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.spec.heartbeat_s):
            e = self.engine
            try:
                queued = sum(r.num_tokens - r.num_computed_tokens for r in e.scheduler.waiting)
                sent, received = self.kv_bytes()
                self.control.report(
                    worker_id=self.spec.worker_id, running=e.scheduler.num_running,
                    waiting=e.scheduler.num_waiting, free_blocks=e.pool.num_free_blocks,
                    total_blocks=e.pool.num_blocks, kv_bytes_sent=sent,
                    kv_bytes_received=received, steps=e.num_steps,
                    loop_age_s=time.monotonic() - self.loop_time,
                    queued_prefill_tokens=queued, pending_transfers=self.pending_transfers(),
                    **self.step_stats.fields(), **self.kv_received.fields())
            except Exception as exc:  # router gone or slow: keep serving, log once a beat
                log.warning("heartbeat failed: %s", exc)

    # ---- messaging ----------------------------------------------------------------------
    def send_to(self, address: str, msg) -> None:
        sock = self._peers.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            self._peers[address] = sock
        sock.send(m.encode(msg))

    def publish(self, deltas: list[m.TokenDelta]) -> None:
        if deltas and self.out is not None:
            self.out.send(m.encode(m.TokenBatch(self.spec.token, self.spec.worker_id, deltas)))

    def _authentic(self, msg) -> bool:
        return hmac.compare_digest(getattr(msg, "token", ""), self.spec.token)

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> None:
        """Register, then serve until ``stop``. Blocks the calling thread."""
        self.register()
        threading.Thread(target=self._heartbeat, daemon=True, name="heartbeat").start()
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        while not self._stop.is_set():
            self.loop_time = time.monotonic()
            # poll without waiting only when a step has work: requests held for a KV
            # transfer are not (a spinning loop would take a core from the peers)
            busy = self.engine.has_work() or not self.local.empty()
            events = dict(poller.poll(0 if busy else 5))
            if self.inbox in events:
                while True:
                    try:
                        frame = self.inbox.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = m.decode(frame)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        log.warning("dropped a malformed frame: %s", exc)
                        continue
                    if not self._authentic(msg):
                        log.warning("dropped a frame with a wrong cluster token")
                        continue
                    self.handle(msg)
            while True:
                try:
                    fn = self.local.get_nowait()
                except queue.Empty:
                    break
                fn()
            self._expire_deadlines()
            self.housekeeping()
            if self.engine.has_work():
                steps, t0 = self.engine.num_steps, time.perf_counter()
                deltas = self.step()
                if self.engine.num_steps != steps:
                    self.step_stats.add(self.engine.current_schedule, time.perf_counter() - t0)
                self.publish(deltas)
            self.kv_events.publish(self.engine.pool.take_events())
            self.kv_events.serve_snapshots()

    def _expire_deadlines(self) -> None:
        if not self.deadlines:
            return
        now = time.time()
        for rid, deadline in list(self.deadlines.items()):
            if now > deadline:
                self.abort(rid, "deadline exceeded")

    def stop(self) -> None:
        self._stop.set()

    # ---- for subclasses -----------------------------------------------------------------
    def handle(self, msg) -> None:
        raise NotImplementedError

    def housekeeping(self) -> None:
        """Periodic work on the loop thread, once a turn after the inbox (leases)."""

    def tick(self, _layer: int | None = None) -> None:
        """Progress inside a step (called per layer): a long step is not a stalled loop."""
        self.loop_time = time.monotonic()

    def step(self) -> list[m.TokenDelta]:
        deltas = self.engine.step(self.tick)
        for d in deltas:
            if d.finished:
                self.deadlines.pop(d.request_id, None)
        return [delta_to_wire(d) for d in deltas]

    def abort(self, request_id: str, reason: str) -> None:
        """Abort locally and free blocks; subclasses also tell peers."""
        self.deadlines.pop(request_id, None)
        if self.engine.abort(request_id):
            self.publish([m.TokenDelta(request_id=request_id, token_ids=[], text="",
                                       finished=True, finish_reason="abort",
                                       error=None if reason == "client" else reason)])
