"""The router side of KV events: per-worker sequence tracking, snapshots, the SUB socket.

One ``EventStream`` per worker applies that worker's batches to the shared
``PrefixIndex`` in order::

    state SYNCING (no snapshot yet, or a gap seen): batches are buffered
        on KVSnapshot(seq=n): index := snapshot; replay buffered batches > n
    state LIVE (last = n): batch n+1 applied; a batch or tick with seq > n+1 is a
        gap -> drop the worker's entries, SYNCING, ask for a snapshot;
        seq <= n is a duplicate (ignored)

``EventStream`` is socket-free (unit-tested on its own); ``KVEventSubscriber``
owns the sockets: one SUB connected to every worker's events address, one
DEALER per worker for snapshot requests, and a sync loop that follows the
registry (new or re-registered workers are connected and snapshotted; workers
gone or unhealthy are dropped from the index until they are healthy again).

Public names: ``EventStream``, ``KVEventSubscriber``.
"""

import asyncio
import contextlib
import logging
import time

import msgspec
import zmq
import zmq.asyncio

from pdserve.engine import kv_events as ev
from pdserve.router.prefix_index import PrefixIndex

log = logging.getLogger("pdserve.router.kv_events")


class EventStream:
    """One worker's events into the index. ``on_*`` mutate the index and return True
    when a snapshot must be requested."""

    MAX_BUFFER = 4096

    def __init__(self, worker_id: str, index: PrefixIndex) -> None:
        self.worker_id = worker_id
        self.index = index
        self.last_seq: int | None = None  # None: syncing
        self.buffer: list[ev.KVEventBatch] = []
        self.num_gaps = 0
        self.num_snapshots = 0

    @property
    def live(self) -> bool:
        return self.last_seq is not None

    def on_batch(self, batch: ev.KVEventBatch) -> bool:
        if self.last_seq is None:
            if batch.events and len(self.buffer) < self.MAX_BUFFER:
                self.buffer.append(batch)
            return False
        if batch.seq <= self.last_seq and (batch.events or batch.seq == self.last_seq):
            return False  # duplicate, or a tick confirming where we are
        if batch.seq != self.last_seq + 1 or not batch.events:
            return self.lose()
        self._apply(batch)
        return False

    def on_snapshot(self, snap: ev.KVSnapshot) -> bool:
        """Install a snapshot and replay what arrived after it. True if still a gap."""
        self.index.replace(self.worker_id, snap.block_hashes)
        self.last_seq = snap.seq
        self.num_snapshots += 1
        pending, self.buffer = sorted(self.buffer, key=lambda b: b.seq), []
        for batch in pending:
            if batch.seq <= self.last_seq:
                continue
            if batch.seq != self.last_seq + 1:
                return self.lose()
            self._apply(batch)
        return False

    def lose(self) -> bool:
        """Forget the worker's entries and wait for a snapshot (gap, reconnect, unhealthy)."""
        if self.last_seq is not None:
            self.num_gaps += 1
        self.index.clear_worker(self.worker_id)
        self.last_seq = None
        self.buffer = []
        return True

    def _apply(self, batch: ev.KVEventBatch) -> None:
        for e in batch.events:
            if e.kind == "stored":
                self.index.store(self.worker_id, e.block_hashes)
            elif e.kind == "removed":
                self.index.remove(self.worker_id, e.block_hashes)
            elif e.kind == "cleared":
                self.index.clear_worker(self.worker_id)
        self.last_seq = batch.seq


class KVEventSubscriber:
    """Keeps ``index`` in step with the workers in ``registry``. Runs in the router's loop."""

    def __init__(self, registry, token: str, index: PrefixIndex | None = None,
                 sync_s: float = 0.2, snapshot_timeout_s: float = 2.0) -> None:
        self.registry = registry
        self.token = token
        self.index = index or PrefixIndex()
        self.sync_s = sync_s
        self.snapshot_timeout_s = snapshot_timeout_s
        self.ctx = zmq.asyncio.Context.instance()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.streams: dict[str, EventStream] = {}
        self._addr: dict[str, tuple[str, str]] = {}  # worker -> (events, snapshot) address
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self._asked: dict[str, float] = {}  # worker -> when a snapshot was last asked
        self._tasks: list[asyncio.Task] = []
        self.dropped_frames = 0

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._sync())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for d in self._dealers.values():
            d.close(0)
        self.sub.close(0)

    def is_live(self, worker_id: str) -> bool:
        s = self.streams.get(worker_id)
        return s is not None and s.live

    # ---- following the registry ----------------------------------------------------------
    def sync_once(self) -> None:
        """Connect new workers, drop gone/unhealthy ones, re-ask overdue snapshots."""
        healthy = {w.worker_id: w for w in self.registry.healthy("prefill", "decode",
                                                                  "colocated")}
        for wid in list(self.streams):
            w = self.registry.workers.get(wid)
            addr = (getattr(w, "events_address", ""), getattr(w, "snapshot_address", "")) \
                if w else None
            if w is None or addr != self._addr.get(wid):
                self._disconnect(wid)
            elif wid not in healthy and self.streams[wid].live:
                self.streams[wid].lose()
        now = time.monotonic()
        for wid, w in healthy.items():
            if not getattr(w, "events_address", "") or not getattr(w, "snapshot_address", ""):
                continue
            if wid not in self.streams:
                self._connect(wid, (w.events_address, w.snapshot_address))
            s = self.streams[wid]
            if not s.live and now - self._asked.get(wid, 0.0) > self.snapshot_timeout_s:
                self._ask(wid)

    def _connect(self, wid: str, addr: tuple[str, str]) -> None:
        self._addr[wid] = addr
        self.sub.connect(addr[0])
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(addr[1])
        self._dealers[wid] = dealer
        self.streams[wid] = EventStream(wid, self.index)
        self._tasks.append(asyncio.create_task(self._snapshots(wid, dealer)))

    def _disconnect(self, wid: str) -> None:
        self.streams.pop(wid).lose()
        addr = self._addr.pop(wid)
        with contextlib.suppress(zmq.ZMQError):
            self.sub.disconnect(addr[0])
        self._dealers.pop(wid).close(0)
        self._asked.pop(wid, None)

    def _ask(self, wid: str) -> None:
        self._asked[wid] = time.monotonic()
        with contextlib.suppress(zmq.Again):
            self._dealers[wid].send(ev.encode(ev.SnapshotRequest(self.token, wid)), zmq.NOBLOCK)

    # ---- loops --------------------------------------------------------------------------
    async def _sync(self) -> None:
        while True:
            try:
                self.sync_once()
            except Exception:  # never let bookkeeping kill the loop
                log.exception("kv event sync failed")
            await asyncio.sleep(self.sync_s)

    async def _receive(self) -> None:
        while True:
            frame = await self.sub.recv()
            try:
                batch = ev.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.dropped_frames += 1
                continue
            s = self.streams.get(getattr(batch, "worker_id", ""))
            if not isinstance(batch, ev.KVEventBatch) or s is None:
                self.dropped_frames += 1
                continue
            if s.on_batch(batch):
                self._ask(s.worker_id)

    async def _snapshots(self, wid: str, dealer) -> None:
        with contextlib.suppress(zmq.ZMQError):
            while True:
                frame = await dealer.recv()
                try:
                    snap = ev.decode(frame)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self.dropped_frames += 1
                    continue
                s = self.streams.get(wid)
                if not isinstance(snap, ev.KVSnapshot) or s is None or snap.error:
                    log.warning("bad snapshot from %s: %s", wid, getattr(snap, "error", snap))
                    continue
                if s.on_snapshot(snap):
                    self._ask(wid)
