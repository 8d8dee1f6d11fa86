"""Layer-by-layer KV transfers between two processes land exactly, for tcp and nixl."""

import random

import numpy as np
import pytest
import torch
from conftest import SENDER_SEED
from fabric_actor import POISON, SHAPE, make_cache, plan_to_wire

from pdserve.kvfabric import KVConnectorScheduler

pytestmark = pytest.mark.timeout(90)

BYTES_PER_BLOCK_LAYER = 2 * 16 * 2 * 32 * 4  # K + V of one block in one layer, fp32
ALL_LAYERS = list(range(SHAPE["num_layers"]))
SCHED = KVConnectorScheduler(SHAPE["num_layers"])


def receiver_cache(peers) -> torch.Tensor:
    raw = np.frombuffer(peers.receiver.call("dump"), dtype=np.float32).copy()
    return torch.from_numpy(raw).view(make_cache(None).shape)


def assert_landed(got: torch.Tensor, moves: dict[int, int]) -> None:
    """dst blocks equal their src blocks in every layer; every other block is poison."""
    ref = make_cache(SENDER_SEED)
    dst = sorted(moves)
    assert torch.equal(got[:, :, dst], ref[:, :, [moves[d] for d in dst]])
    untouched = [b for b in range(SHAPE["num_blocks"]) if b not in moves]
    assert bool((got[:, :, untouched] == POISON).all())


def test_layers_land_in_dst_blocks_and_bytes_are_counted(peers):
    rng = random.Random(1)
    src, dst = rng.sample(range(64), 12), rng.sample(range(64), 12)
    recv_plan = SCHED.plan("req-a", None, dst, num_cached_blocks=3)
    send_plan = SCHED.plan_from_suffix("req-a", src, 3, recv_plan.dst_block_ids)
    before, sent_before = peers.stats(), peers.sender.call("sender_stats", "main")

    peers.receiver.call("expect", plan_to_wire(recv_plan), 10.0)
    sent = peers.sender.call("send", "main", plan_to_wire(send_plan), ALL_LAYERS)
    peers.sender.call("finish", "main", plan_to_wire(send_plan), b"\x00first=42\xff")

    assert peers.events(1) == [["complete", "req-a#0", b"\x00first=42\xff"]]
    assert sent == 9 * 4 * BYTES_PER_BLOCK_LAYER == 294912
    after, sent_after = peers.stats(), peers.sender.call("sender_stats", "main")
    assert after["bytes_received"] - before["bytes_received"] == 294912
    assert sent_after["bytes_sent"] - sent_before["bytes_sent"] == 294912
    assert after["num_pending"] == 0
    assert_landed(receiver_cache(peers), dict(zip(dst[3:], src[3:], strict=True)))


def test_send_layers_moves_every_layer_in_one_call(peers):
    """The bulk path (cuda_ipc: one copy and one checksum launch for all layers) lands the
    same bytes as layer-by-layer sends; a second plan right after reuses nothing stale."""
    rng = random.Random(11)
    for name, seed in (("bulk-a", 0), ("bulk-b", 1)):
        src, dst = rng.sample(range(64), 7), rng.sample(range(64), 7)
        plan = SCHED.plan(name, src, dst, num_cached_blocks=seed)
        peers.receiver.call("repoison")
        peers.receiver.call("expect", plan_to_wire(plan), 10.0)
        sent = peers.sender.call("send_all", "main", plan_to_wire(plan))
        assert sent == (7 - seed) * 4 * BYTES_PER_BLOCK_LAYER
        peers.sender.call("finish", "main", plan_to_wire(plan), name.encode())
        assert peers.events(1) == [["complete", f"{name}#0", name.encode()]]
        assert_landed(receiver_cache(peers), dict(zip(dst[seed:], src[seed:], strict=True)))


def test_interleaved_transfers_in_any_layer_order(peers):
    rng = random.Random(2)
    src = rng.sample(range(64), 10)
    dst = rng.sample(range(64), 10)
    plan_a = SCHED.plan("req-b", src[:4], dst[:4], 0, attempt=2)
    plan_b = SCHED.plan("req-c", src[4:], dst[4:], 1)
    for plan in (plan_a, plan_b):
        peers.receiver.call("expect", plan_to_wire(plan), 10.0)
    for layer in (3, 1, 0, 2):
        peers.sender.call("send", "main", plan_to_wire(plan_a), [layer])
        peers.sender.call("send", "main", plan_to_wire(plan_b), [3 - layer])
    peers.sender.call("finish", "main", plan_to_wire(plan_b), b"b")
    peers.sender.call("finish", "main", plan_to_wire(plan_a), b"a")

    assert sorted(peers.events(2)) == [["complete", "req-b#2", b"a"],
                                       ["complete", "req-c#0", b"b"]]
    assert peers.stats()["num_pending"] == 0
    moved = dict(zip(dst[:4] + dst[5:], src[:4] + src[5:], strict=True))
    assert_landed(receiver_cache(peers), moved)


def test_fully_cached_prompt_moves_no_bytes(peers):
    plan = SCHED.plan("req-d", [5, 6], [9, 8], num_cached_blocks=2)
    assert plan.num_blocks == 0
    before = peers.stats()["bytes_received"]
    peers.receiver.call("expect", plan_to_wire(plan), 10.0)
    assert peers.sender.call("send", "main", plan_to_wire(plan), ALL_LAYERS) == 0
    peers.sender.call("finish", "main", plan_to_wire(plan), b"")
    assert peers.events(1) == [["complete", "req-d#0", b""]]
    assert peers.stats()["bytes_received"] == before
    assert_landed(receiver_cache(peers), {})


def test_layers_without_finish_do_not_complete(peers):
    plan = SCHED.plan("req-e", [1, 2], [3, 4], 0)
    peers.receiver.call("expect", plan_to_wire(plan), 10.0)
    peers.sender.call("send", "main", plan_to_wire(plan), ALL_LAYERS)
    assert peers.events(1, timeout_s=0.5) == []
    assert peers.stats()["num_pending"] == 1
    peers.sender.call("finish", "main", plan_to_wire(plan), b"done")
    assert peers.events(1) == [["complete", "req-e#0", b"done"]]
    assert_landed(receiver_cache(peers), {3: 1, 4: 2})
