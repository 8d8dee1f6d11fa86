"""KV events: in-order application, gaps and snapshots, duplicates, workers leaving; and
the real sockets (worker PUB + snapshot ROUTER, router SUB + DEALER) end to end."""

import asyncio
import time
from dataclasses import dataclass

import zmq

from pdserve.engine import kv_events as ev
from pdserve.engine.block_pool import BlockPool, KVEvent
from pdserve.router.kv_events import EventStream, KVEventSubscriber
from pdserve.router.prefix_index import PrefixIndex


def batch(seq, *events, wid="w"):
    return ev.KVEventBatch(wid, seq, [ev.KVEventMsg(k, list(h)) for k, h in events])


def test_in_order_batches_apply_and_duplicates_are_ignored():
    idx = PrefixIndex()
    s = EventStream("w", idx)
    assert not s.on_batch(batch(1, ("stored", [1, 2])))  # buffered until a snapshot
    assert idx.match([1]) == {}
    assert not s.on_snapshot(ev.KVSnapshot("w", 0, []))
    assert idx.match([1, 2]) == {"w": 2} and s.last_seq == 1
    assert not s.on_batch(batch(2, ("stored", [3]), ("removed", [2])))
    assert not s.on_batch(batch(2, ("stored", [9])))  # duplicate
    assert not s.on_batch(batch(2))  # a tick at the current seq
    assert idx.match([1, 2, 3]) == {"w": 1} and not idx.holds("w", 9)
    assert not s.on_batch(batch(3, ("cleared", [])))
    assert idx.num_blocks("w") == 0 and s.last_seq == 3


def test_a_gap_drops_the_entries_and_the_snapshot_replays_what_follows():
    idx = PrefixIndex()
    s = EventStream("w", idx)
    s.on_snapshot(ev.KVSnapshot("w", 4, [1, 2]))
    assert s.on_batch(batch(6, ("stored", [3])))  # 5 was lost: ask for a snapshot
    assert not s.live and idx.num_blocks("w") == 0 and s.num_gaps == 1
    s.on_batch(batch(7, ("stored", [4])))
    s.on_batch(batch(8, ("removed", [1])))
    assert not s.on_snapshot(ev.KVSnapshot("w", 7, [1, 2, 3, 4]))
    assert s.last_seq == 8 and idx.match([1]) == {} and idx.match([2, 3]) == {"w": 2}
    assert {h for h in (1, 2, 3, 4) if idx.holds("w", h)} == {2, 3, 4}
    assert s.on_batch(batch(9))  # a tick ahead of us: batch 9 was lost


def test_a_snapshot_older_than_the_buffer_asks_again():
    s = EventStream("w", PrefixIndex())
    s.on_batch(batch(5, ("stored", [1])))
    assert s.on_snapshot(ev.KVSnapshot("w", 3, []))  # batch 4 is nowhere
    assert not s.live


def test_messages_roundtrip():
    for msg in (batch(3, ("stored", [2**64 - 1])), ev.SnapshotRequest("t", "w"),
                ev.KVSnapshot("w", 2, [5, 6])):
        assert ev.decode(ev.encode(msg)) == msg


@dataclass
class FakeWorker:
    worker_id: str
    role: str
    events_address: str
    snapshot_address: str


class FakeRegistry:
    def __init__(self):
        self.workers = {}
        self.unhealthy = set()

    def healthy(self, *roles):
        return [w for w in self.workers.values() if w.role in roles
                and w.worker_id not in self.unhealthy]


def test_publisher_and_subscriber_over_sockets():
    asyncio.run(_sockets())


async def _until(cond, pub=None, timeout_s=5.0):
    t0 = time.monotonic()
    while not cond():
        if pub is not None:
            pub.serve_snapshots()
            pub.publish([])
        assert time.monotonic() - t0 < timeout_s
        await asyncio.sleep(0.01)


async def _sockets():
    ctx = zmq.Context()
    pub = ev.KVEventPublisher(ctx, "p0", "secret", tick_s=0.05)
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for b, h in zip(blocks, (11, 12, 13), strict=True):
        pool.cache_block(b, h, (h,), None)
    pub.publish(pool.take_events())  # before anyone listens: only a snapshot shows these
    reg = FakeRegistry()
    reg.workers["p0"] = FakeWorker("p0", "prefill", pub.address, pub.snapshot_address)
    sub = KVEventSubscriber(reg, "secret", sync_s=0.02)
    await sub.start()
    try:
        await _until(lambda: sub.is_live("p0"), pub)
        assert sub.index.match([11, 12, 13]) == {"p0": 3}
        assert sub.streams["p0"].num_snapshots == 1
        await asyncio.sleep(0.2)  # let the SUB connection settle (slow joiner)
        pool.free(blocks[::-1])
        pool.allocate(1)  # evicts 13 (the tail was freed first)
        pub.publish(pool.take_events())
        await _until(lambda: sub.index.match([11, 12, 13]) == {"p0": 2}, pub)
        # a lost batch: the next one shows the gap, a snapshot repairs it
        pub.seq += 1
        pub.cached.discard(12)
        pub.publish([KVEvent("stored", (14,))])
        await _until(lambda: sub.streams["p0"].num_snapshots == 2 and sub.is_live("p0"), pub)
        assert sub.streams["p0"].num_gaps == 1
        assert sub.index.match([11, 12]) == {"p0": 1} and sub.index.holds("p0", 14)
        # unhealthy: dropped; healthy again: re-synced
        reg.unhealthy.add("p0")
        await _until(lambda: sub.index.num_blocks("p0") == 0)
        reg.unhealthy.clear()
        await _until(lambda: sub.is_live("p0") and sub.index.num_blocks("p0") == 2, pub)
        # the worker leaves the table: its entries go
        del reg.workers["p0"]
        await _until(lambda: "p0" not in sub.streams)
        assert sub.index.workers() == []
    finally:
        await sub.close()
        pub.close()
        ctx.term()


def test_snapshot_requests_need_the_token():
    ctx = zmq.Context()
    pub = ev.KVEventPublisher(ctx, "p0", "secret")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(pub.snapshot_address)
    try:
        dealer.send(ev.encode(ev.SnapshotRequest("wrong", "p0")))
        dealer.send(b"\xc1garbage")
        dealer.send(ev.encode(ev.SnapshotRequest("secret", "p9")))
        t0 = time.monotonic()
        n = 0
        while n == 0 and time.monotonic() - t0 < 5:
            n = pub.serve_snapshots()
            time.sleep(0.01)
        assert n == 1
        reply = ev.decode(dealer.recv())
        assert reply == ev.KVSnapshot("p0", 0, [], "this is worker p0, not p9")
    finally:
        dealer.close(0)
        pub.close()
        ctx.term()
