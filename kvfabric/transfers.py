"""The decode side's table of expected transfers: one small state machine each.

    expect ──> RECEIVING ──(every layer verified + sealed FINISH)──> on_complete
                   │
                   ├─(ABORT / peer died / truncated frame)───────────> on_error
                   └─(cancel / time-out / bad frame / digest mismatch /
                      replayed layer)──> DRAINING ─(acks, or grace over)─> on_error

A layer counts only once its block digests matched (``layer_arrived`` takes
the outcome of that check and fails the transfer on a mismatch), and a
FINISH only once its seal matched, so a transfer completes only when every
layer's bytes were verified. A frame for a transfer that is not expected
(completed, failed, an old attempt, never expected) is dropped and counted.

DRAINING exists for one-sided (nixl) peers only: their writes land without
us, so we wait until each such peer confirmed (CANCEL_ACK) that nothing of
the transfer is still in flight. Either way, a transfer's blocks may be
reused once its callback has run, and nothing is written into them by us
after it left RECEIVING. Exactly one callback runs per expected transfer.

All methods take the table's lock and return the callbacks to run; the
caller runs them after the lock is released (``run_actions``).
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.kvfabric.descriptors import FabricIdentity, TransferPlan
from pdserve.kvfabric.digests import layer_aux_size
from pdserve.kvfabric.frames import FrameHeader, dst_digest

log = logging.getLogger(__name__)
Action = Callable[[], None]
DRAIN_GRACE_S = 5.0


@dataclass(eq=False)
class Pending:
    plan: TransferPlan
    dst_index: torch.Tensor  # [n] int64 on the KV device
    on_complete: Callable[[TransferPlan, bytes], None]
    on_error: Callable[[TransferPlan, str], None]
    deadline: float
    timeout_s: float
    layer_bytes: int
    digest: int
    layers_seen: list[bool]  # layer arrived and its digests matched
    num_layers_seen: int = 0
    payload: bytes | None = None
    owner: object | None = None  # the connection its frames came on
    failed: str | None = None  # reason, once it left RECEIVING
    drain_from: set = field(default_factory=set)  # one-sided peers yet to ack
    drain_deadline: float = 0.0
    on_timing: Callable[[TransferPlan, int, float], None] | None = None
    nbytes: int = 0  # KV payload landed so far
    wire_s: float = 0.0  # time its layer frames took to read (0 where not measured)


def check_frame(t: Pending, h: FrameHeader, is_layer: bool) -> str | None:
    """Why frame ``h`` is wrong for transfer ``t``, or None. Pure."""
    if h.request_id != t.plan.request_id:
        return f"request_id mismatch: frame {h.request_id!r}, expected {t.plan.request_id!r}"
    if h.attempt != t.plan.attempt:
        return f"attempt mismatch: frame {h.attempt}, expected {t.plan.attempt}"
    if h.dst_digest != t.digest:
        return "dst block ids differ between prefill and decode plans"
    if not is_layer:
        return None
    if not 0 <= h.layer < t.plan.num_layers:
        return f"layer {h.layer} out of range 0..{t.plan.num_layers - 1}"
    if t.layers_seen[h.layer]:
        return f"layer {h.layer} received twice (replayed frame)"
    if h.nbytes != t.layer_bytes:
        return f"layer {h.layer} has {h.nbytes} bytes, expected {t.layer_bytes}"
    if h.aux_nbytes != layer_aux_size(t.plan.num_blocks):
        return (f"layer {h.layer} has a digest section of {h.aux_nbytes} bytes, expected "
                f"{layer_aux_size(t.plan.num_blocks)}")
    return None


class TransferTable:
    """Expected transfers by id, with byte counters. Thread-safe."""

    def __init__(self, identity: FabricIdentity, live_peers: Callable[[], list]) -> None:
        self.identity = identity
        self._live_peers = live_peers  # connections; ``.one_sided`` ones write on their own
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        self.bytes_received = 0
        self.num_dropped_frames = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def add(self, t: Pending) -> None:
        """Start expecting ``t``. Raises ValueError if its id is already expected."""
        with self._lock:
            if t.plan.transfer_id in self._pending:
                raise ValueError(f"transfer {t.plan.transfer_id} is already expected")
            self._pending[t.plan.transfer_id] = t

    def new_pending(self, plan, dst_index, on_complete, on_error, timeout_s,
                    on_timing=None) -> Pending:
        """A Pending for ``plan`` (not added). Pure."""
        n = plan.num_layers if plan.num_blocks else 0
        return Pending(plan, dst_index, on_complete, on_error, time.monotonic() + timeout_s,
                       timeout_s, layer_bytes=2 * plan.num_blocks * self.identity.bytes_per_block,
                       digest=dst_digest(plan.dst_block_ids),
                       layers_seen=[False] * plan.num_layers if n else [True] * plan.num_layers,
                       num_layers_seen=plan.num_layers - n, on_timing=on_timing)

    def precheck_layer(self, conn, h: FrameHeader) -> tuple[Pending | None, list[Action]]:
        """Before reading or verifying a layer: (its transfer if worth it, actions).

        Fails a transfer the frame is wrong for; drops (and counts) a frame
        for a transfer that is not expected. The Pending's plan and
        dst_index are immutable: safe to read without the lock.
        """
        with self._lock:
            t = self._pending.get(h.transfer_id)
            if t is None or t.failed:
                self.num_dropped_frames += 1
                return None, []
            t.owner = conn
            reason = check_frame(t, h, is_layer=True)
            return (t, []) if reason is None else (None, self._fail(t, reason, drain=True))

    def layer_arrived(self, conn, h: FrameHeader, write: Callable[[Pending], None] | None,
                      digest_error: str | None, wire_s: float = 0.0) -> list[Action]:
        """A layer landed (nixl) or is staged (tcp: ``write`` scatters it, under the lock).

        ``digest_error``: the outcome of checking the layer's block digests
        (None: all matched). A mismatch fails the transfer and writes nothing.
        ``wire_s``: how long the layer took to read off the wire (0: not measured).
        """
        with self._lock:
            t, actions = self._admit(conn, h, True, digest_error)
            if t is None:
                return actions
            if write is not None:
                write(t)
            t.layers_seen[h.layer] = True
            t.num_layers_seen += 1
            self.bytes_received += h.nbytes
            t.nbytes += h.nbytes
            t.wire_s += wire_s
            return self._maybe_complete(t)

    def finish_arrived(self, conn, h: FrameHeader, payload: bytes,
                       seal_error: str | None, all_layers: bool = False) -> list[Action]:
        """The FINISH frame arrived; ``seal_error``: the outcome of checking its seal
        (and, with ``all_layers``, of every layer's digests it carried: the path's layers
        left no frames, so a verified FINISH lands every layer at once)."""
        with self._lock:
            t, actions = self._admit(conn, h, False, seal_error)
            if t is None:
                return actions
            if all_layers and t.plan.num_blocks:  # (no blocks: every layer counts already)
                if t.num_layers_seen:
                    return self._fail(t, "layer frames on a path whose layers travel in "
                                         "FINISH", drain=True)
                landed = t.layer_bytes * t.plan.num_layers
                t.layers_seen = [True] * t.plan.num_layers
                t.num_layers_seen = t.plan.num_layers
                self.bytes_received += landed
                t.nbytes += landed
            t.payload = payload
            return self._maybe_complete(t)

    def begin(self, conn, h: FrameHeader) -> list[Action]:
        """A BEGIN frame: ``conn`` writes this transfer (its death fails it). A frame
        wrong for the transfer fails it; one for no expected transfer is dropped."""
        with self._lock:
            t, actions = self._admit(conn, h, False, None)
            return actions

    def lookup(self, h: FrameHeader) -> Pending | None:
        """The expected, not failed transfer a FINISH names, if its ids match (to check
        its digests before ``finish_arrived``). Plan and dst_index are immutable."""
        with self._lock:
            t = self._pending.get(h.transfer_id)
            ok = t is not None and not t.failed and check_frame(t, h, is_layer=False) is None
            return t if ok else None

    def _admit(self, conn, h: FrameHeader, is_layer: bool,
               check_error: str | None) -> tuple["Pending | None", list[Action]]:
        """Under the lock: the pending transfer a frame belongs to, or (None, actions) when
        the frame is dropped (unknown or failed transfer) or fails its transfer (bad frame,
        digest or seal). Mutates the table's counters and the transfer's owner."""
        t = self._pending.get(h.transfer_id)
        if t is None or t.failed:
            self.num_dropped_frames += 1
            return None, []
        t.owner = conn
        reason = check_frame(t, h, is_layer=is_layer) or check_error
        if reason is not None:
            return None, self._fail(t, reason, drain=True)
        return t, []

    def fail(self, transfer_id: str, reason: str, drain: bool = True) -> list[Action] | None:
        """Fail a transfer (cancel, abort, bad frame). None if it is not expected."""
        with self._lock:
            t = self._pending.get(transfer_id)
            return None if t is None or t.failed else self._fail(t, reason, drain)

    def peer_acked(self, conn, transfer_id: str) -> list[Action]:
        with self._lock:
            t = self._pending.get(transfer_id)
            if t is None or not t.failed:
                return []
            t.drain_from.discard(conn)
            return self._maybe_drained(t)

    def peer_lost(self, conn, reason: str) -> list[Action]:
        """Fail the transfers whose frames came from ``conn``; stop waiting for its acks."""
        actions: list[Action] = []
        with self._lock:
            for t in list(self._pending.values()):
                if t.failed:
                    t.drain_from.discard(conn)
                    actions += self._maybe_drained(t)
                elif t.owner is conn:
                    actions += self._fail(t, reason, drain=False)
        return actions

    def expire(self, now: float) -> list[Action]:
        """Time out overdue transfers, and finish drains whose grace is over."""
        actions: list[Action] = []
        with self._lock:
            for t in list(self._pending.values()):
                if t.failed is None and now >= t.deadline:
                    actions += self._fail(t, f"timed out after {t.timeout_s:g} s", drain=True)
                elif t.failed and now >= t.drain_deadline:
                    t.failed += " (a peer did not confirm the cancel in time)"
                    t.drain_from.clear()
                    actions += self._maybe_drained(t)
        return actions

    # -- lock held below --

    def _fail(self, t: Pending, reason: str, drain: bool) -> list[Action]:
        t.failed = reason
        actions: list[Action] = []
        peers = [t.owner] if t.owner is not None else self._live_peers()
        for conn in peers:
            actions.append(lambda c=conn: c.send_cancel(t.plan, reason))
        if drain:
            live = set(self._live_peers())
            t.drain_from = {c for c in peers if c.one_sided and c in live}
            t.drain_deadline = time.monotonic() + DRAIN_GRACE_S
        return actions + self._maybe_drained(t)

    def _maybe_drained(self, t: Pending) -> list[Action]:
        if t.drain_from:
            return []
        del self._pending[t.plan.transfer_id]
        return [lambda: t.on_error(t.plan, t.failed)]

    def _maybe_complete(self, t: Pending) -> list[Action]:
        if t.num_layers_seen < t.plan.num_layers or t.payload is None:
            return []
        del self._pending[t.plan.transfer_id]
        payload = t.payload
        timing = [] if t.on_timing is None else [
            lambda: t.on_timing(t.plan, t.nbytes, t.wire_s)]
        return timing + [lambda: t.on_complete(t.plan, payload)]


def run_actions(actions: list[Action]) -> None:
    """Run callbacks outside any lock; a raising callback is logged, not propagated."""
    for action in actions:
        try:
            action()
        except Exception:
            log.exception("KV fabric callback raised")
