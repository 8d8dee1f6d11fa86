"""KV events on the wire, and the worker side that publishes them.

Each worker tells the router which blocks it holds, so the router's prefix index
(router/prefix_index.py) stays true::

    worker loop: pool.take_events() -> KVEventPublisher.publish()
        PUB (bound, events_address)  --KVEventBatch(seq=n)-->  router SUB
        every ``tick_s`` without events: an empty batch with the current seq,
        so a subscriber notices a lost last batch
    router DEALER --SnapshotRequest(token)--> worker ROUTER (bound, same host)
                  <--KVSnapshot(seq, every cached hash)--

Sequence numbers count batches per worker from 1; a snapshot at ``seq = n``
holds exactly the state after batches ``1..n``. The publisher keeps that state
itself (the hashes its own events stored minus those they removed), so the
snapshot never disagrees with the events. Only the loop thread calls it.
Snapshot requests must carry the cluster token; events carry hashes only.

Public names: ``KVEventMsg``, ``KVEventBatch``, ``SnapshotRequest``, ``KVSnapshot``,
``encode``, ``decode``, ``KVEventPublisher``.
"""

import hmac
import logging
import time

import msgspec
import zmq

from pdserve.engine.block_pool import KVEvent

log = logging.getLogger("pdserve.kv_events")


class KVEventMsg(msgspec.Struct, array_like=True, frozen=True):
    kind: str  # "stored" | "removed" | "cleared"
    block_hashes: list[int]
    parent_hash: int | None = None


class KVEventBatch(msgspec.Struct, tag="kv_events", frozen=True):
    worker_id: str
    seq: int  # this batch's number; an empty batch repeats the last one's (a tick)
    events: list[KVEventMsg]


class SnapshotRequest(msgspec.Struct, tag="kv_snapshot_request", frozen=True):
    token: str
    worker_id: str  # the worker asked (a check that the address is the right one)


class KVSnapshot(msgspec.Struct, tag="kv_snapshot", frozen=True):
    worker_id: str
    seq: int  # the state after batches 1..seq
    block_hashes: list[int]
    error: str | None = None


EventMessage = KVEventBatch | SnapshotRequest | KVSnapshot
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventMessage)


def encode(msg: EventMessage) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> EventMessage:
    """Raises msgspec.DecodeError / ValidationError on a malformed frame."""
    return _decoder.decode(data)


class KVEventPublisher:
    """The worker's event PUB socket and snapshot ROUTER socket. Loop thread only."""

    def __init__(self, ctx: zmq.Context, worker_id: str, token: str, host: str = "127.0.0.1",
                 tick_s: float = 1.0) -> None:
        self.worker_id = worker_id
        self.token = token
        self.tick_s = tick_s
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://{host}:{self.pub.bind_to_random_port(f'tcp://{host}')}"
        self.snap = ctx.socket(zmq.ROUTER)
        self.snap.setsockopt(zmq.LINGER, 0)
        self.snapshot_address = \
            f"tcp://{host}:{self.snap.bind_to_random_port(f'tcp://{host}')}"
        self.seq = 0
        self.cached: set[int] = set()
        self._last_sent = time.monotonic()

    def publish(self, events: list[KVEvent]) -> None:
        """Publish ``events`` as one batch (or a tick when due). Mutates seq and the mirror."""
        now = time.monotonic()
        if not events:
            if now - self._last_sent >= self.tick_s:
                self._send(KVEventBatch(self.worker_id, self.seq, []))
                self._last_sent = now
            return
        for e in events:
            if e.kind == "stored":
                self.cached.update(e.block_hashes)
            elif e.kind == "removed":
                self.cached.difference_update(e.block_hashes)
            elif e.kind == "cleared":
                self.cached.clear()
        self.seq += 1
        self._send(KVEventBatch(self.worker_id, self.seq, [
            KVEventMsg(e.kind, list(e.block_hashes), e.parent_hash) for e in events]))
        self._last_sent = now

    def _send(self, batch: KVEventBatch) -> None:
        try:
            self.pub.send(encode(batch), zmq.NOBLOCK)
        except zmq.Again:  # no room: the subscriber sees the gap and asks for a snapshot
            pass

    def serve_snapshots(self) -> int:
        """Answer every waiting snapshot request. Returns how many were answered."""
        n = 0
        while True:
            try:
                ident, frame = self.snap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return n
            except ValueError:
                continue  # not two frames
            try:
                req = decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("dropped a malformed snapshot request")
                continue
            if not isinstance(req, SnapshotRequest) or \
                    not hmac.compare_digest(req.token, self.token):
                log.warning("dropped a snapshot request without the cluster token")
                continue
            error = None if req.worker_id == self.worker_id else \
                f"this is worker {self.worker_id}, not {req.worker_id}"
            reply = KVSnapshot(self.worker_id, self.seq, sorted(self.cached), error)
            self.snap.send_multipart([ident, encode(reply)])
            n += 1

    def close(self) -> None:
        self.pub.close(0)
        self.snap.close(0)
