"""Corrupted, truncated and replayed KV frames fail exactly their transfer; the fault knob.

A man-in-the-middle proxy (``mitm.py``) sits between a real sender process
and the real receiver process (tcp); each tampering must fail only the
transfer it touched, with a reason that names it, never fire on_complete for
it, leave nothing pending, and leave the receiver serving the next transfer.
"""

import random
import time

import pytest
import torch
from conftest import SENDER_SEED
from fabric_actor import POISON, make_cache, plan_to_wire
from mitm import Cut, Mitm
from test_failures import ONE_BLOCK_LAYER
from test_transfer import SCHED, assert_landed, receiver_cache

from pdserve.kvfabric.frames import LAYER, FrameHeader, encode_raw_header

pytestmark = pytest.mark.timeout(120)
tcp_only = pytest.mark.parametrize("module_peers", ["tcp"], indirect=True)


@pytest.fixture
def mitm(peers):
    """Starts a proxy whose tamper function the test sets; connects sender "mitm" through it."""
    rules = {}
    proxy = Mitm(peers.address, lambda h, frame: rules["tamper"](h, frame))

    def start(tamper):
        rules["tamper"] = tamper
        peers.sender.call("connect", "mitm", proxy.address, "tcp")
        return proxy

    yield start
    try:
        peers.sender.call("close_sender", "mitm")
    finally:
        proxy.close()


def is_layer(h: FrameHeader, transfer_id: str, layer: int) -> bool:
    return h.kind == LAYER and h.transfer_id == transfer_id and h.layer == layer


def payload_offset(h: FrameHeader, frame: bytes) -> int:
    return len(frame) - h.nbytes


def wait_pending(peers, count: int) -> None:
    deadline = time.monotonic() + 5
    while peers.stats()["num_pending"] != count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert peers.stats()["num_pending"] == count


def clean_transfer_lands(peers, name: str, sender: str = "main") -> None:
    """A later transfer through the same receiver completes with exact blocks."""
    peers.receiver.call("repoison")
    plan = SCHED.plan(name, [9, 10], [60, 61], 0)
    peers.receiver.call("expect", plan_to_wire(plan), 10.0)
    assert peers.sender.call("transfer", sender, plan_to_wire(plan), b"clean") is None
    assert peers.events(1) == [["complete", f"{name}#0", b"clean"]]
    assert_landed(receiver_cache(peers), {60: 9, 61: 10})
    assert peers.stats()["num_pending"] == 0


@tcp_only
def test_flipped_payload_byte_fails_the_transfer_before_anything_is_written(peers, mitm):
    def flip(h, frame):
        if is_layer(h, "flip#0", 1):  # a byte of K of the plan's block 1
            at = payload_offset(h, frame) + ONE_BLOCK_LAYER + 100
            frame = frame[:at] + bytes([frame[at] ^ 0x10]) + frame[at + 1:]
        return [frame]

    mitm(flip)
    plan = SCHED.plan("flip", [3, 4, 5], [20, 21, 22], 0)
    peers.receiver.call("expect", plan_to_wire(plan), 10.0)
    peers.sender.call("transfer", "mitm", plan_to_wire(plan), b"never")
    assert peers.events(1) == [["error", "flip#0",
                                "digest mismatch in layer 1, block 1 (K of dst block 21, crc32)"]]
    wait_pending(peers, 0)
    got, ref = receiver_cache(peers), make_cache(SENDER_SEED)
    assert torch.equal(got[0][:, [20, 21, 22]], ref[0][:, [3, 4, 5]])  # layer 0 was fine
    assert bool((got[1:] == POISON).all())  # the bad layer and later ones: nothing written
    clean_transfer_lands(peers, "after-flip", sender="mitm")  # same connection still serves


@tcp_only
def test_truncated_frame_then_close_fails_only_its_transfer(peers, mitm):
    def cut(h, frame):
        if is_layer(h, "cut#0", 2):
            return Cut(frame[:payload_offset(h, frame) + h.nbytes // 2])
        return [frame]

    mitm(cut)
    other = SCHED.plan("bystander", [1], [40], 0)  # on the direct connection
    plan = SCHED.plan("cut", [3, 4], [20, 21], 0)
    for p in (other, plan):
        peers.receiver.call("expect", plan_to_wire(p), 10.0)
    peers.sender.call("send", "main", plan_to_wire(other), [0, 1])
    # up to the cut layer only: a later send would race the proxy closing the connection
    peers.sender.call("send", "mitm", plan_to_wire(plan), [0, 1, 2])
    [[kind, tid, reason]] = peers.events(1)
    assert (kind, tid) == ("error", "cut#0")
    assert reason.startswith("truncated LAYER frame layer 2 from prefill peer 127.0.0.1:")
    assert reason.endswith(f"(LAYER payload truncated: peer closed after "
                           f"{ONE_BLOCK_LAYER * 2} of {ONE_BLOCK_LAYER * 4} bytes)")
    wait_pending(peers, 1)  # the bystander still waits for its last layers
    peers.sender.call("send", "main", plan_to_wire(other), [2, 3])
    peers.sender.call("finish", "main", plan_to_wire(other), b"b")
    assert peers.events(1) == [["complete", "bystander#0", b"b"]]
    got = receiver_cache(peers)
    assert torch.equal(got[:, :, 40], make_cache(SENDER_SEED)[:, :, 1])
    assert bool((got[2:, :, [20, 21]] == POISON).all())
    wait_pending(peers, 0)
    clean_transfer_lands(peers, "after-cut")


@tcp_only
def test_layer_replayed_into_its_own_transfer_fails_it(peers, mitm):
    mitm(lambda h, frame: [frame, frame] if is_layer(h, "rep#0", 0) else [frame])
    plan = SCHED.plan("rep", [3, 4], [20, 21], 0)
    peers.receiver.call("expect", plan_to_wire(plan), 10.0)
    peers.sender.call("transfer", "mitm", plan_to_wire(plan), b"never")
    assert peers.events(1) == [["error", "rep#0", "layer 0 received twice (replayed frame)"]]
    wait_pending(peers, 0)
    clean_transfer_lands(peers, "after-rep", sender="mitm")


@tcp_only
def test_old_attempts_frame_replayed_into_a_later_transfer(peers, mitm):
    """Verbatim, the old frame names its own (finished) transfer: dropped and counted;
    rewritten to look like the new one, its seal no longer matches: the new one fails."""
    old = SCHED.plan("req", [3, 4], [20, 21], 0, attempt=0)
    new = SCHED.plan("req", [5, 6], [30, 31], 0, attempt=1)
    newer = SCHED.plan("req", [7, 8], [32, 33], 0, attempt=2)
    saved = {}

    def replay(h, frame):
        if is_layer(h, "req#0", 0):
            saved["old"] = frame
        if is_layer(h, "req#1", 0):
            return [saved["old"], frame]  # verbatim, before the real one
        if is_layer(h, "req#2", 0):  # the real one dropped; old digests and bytes under
            head = encode_raw_header(h)  # its header (the ids have the same length)
            return [head + saved["old"][len(head):]]
        return [frame]

    mitm(replay)
    peers.receiver.call("expect", plan_to_wire(old), 10.0)
    assert peers.sender.call("transfer", "mitm", plan_to_wire(old), b"old") is None
    assert peers.events(1) == [["complete", "req#0", b"old"]]
    dropped = peers.stats()["num_dropped_frames"]

    peers.receiver.call("repoison")
    peers.receiver.call("expect", plan_to_wire(new), 10.0)
    assert peers.sender.call("transfer", "mitm", plan_to_wire(new), b"new") is None
    assert peers.events(1) == [["complete", "req#1", b"new"]]
    assert peers.stats()["num_dropped_frames"] == dropped + 1
    assert_landed(receiver_cache(peers), {30: 5, 31: 6})

    peers.receiver.call("repoison")
    peers.receiver.call("expect", plan_to_wire(newer), 10.0)
    peers.sender.call("transfer", "mitm", plan_to_wire(newer), b"never")
    assert peers.events(1) == [["error", "req#2", (
        "layer 0: digest seal does not match the frame (replayed, rewritten or corrupted "
        "header or digests)")]]
    wait_pending(peers, 0)
    assert bool((receiver_cache(peers) == POISON).all())  # the old bytes were not written
    clean_transfer_lands(peers, "after-replay", sender="mitm")


def test_fault_knob_fails_exactly_the_corrupted_transfers(peers):
    """Rate 0.5 over 20 transfers: the sender's record of what it corrupted is exactly
    the set of failures, each naming its layer and block; the rest land exactly."""
    peers.sender.call("connect", "faulty", peers.address, peers.transport, "cluster-secret",
                      None, 0.5, 11)
    try:
        rng = random.Random(5)
        plans = []
        for i in range(20):
            src, dst = rng.sample(range(64), 3), rng.sample(range(64), 3)
            plans.append(SCHED.plan(f"f{i}", src, dst, 1))
        failed = []
        for i, plan in enumerate(plans):  # one at a time: dst blocks may repeat across plans
            peers.receiver.call("repoison")
            peers.receiver.call("expect", plan_to_wire(plan), 20.0)
            peers.sender.call("transfer", "faulty", plan_to_wire(plan), b"%d" % i)
            [event] = peers.events(1)
            injected = peers.sender.call("faults_injected", "faulty")
            got = receiver_cache(peers)
            if plan.transfer_id in injected:
                failed.append(plan.transfer_id)
                layer, block = injected[plan.transfer_id]
                n = plan.num_blocks
                half = "K" if block < n else "V"
                assert event[:2] == ["error", plan.transfer_id]
                assert event[2].startswith(f"digest mismatch in layer {layer}, block {block} "
                                           f"({half} of dst block "
                                           f"{plan.dst_block_ids[block % n]}, ")
                if peers.transport == "tcp":  # checked before the scatter: nothing written
                    assert bool((got[layer:, :, list(plan.dst_block_ids)] == POISON).all())
            else:
                assert event == ["complete", plan.transfer_id, b"%d" % i]
                assert_landed(got, dict(zip(plan.dst_block_ids, plan.src_block_ids,
                                            strict=True)))
            wait_pending(peers, 0)
        assert sorted(peers.sender.call("faults_injected", "faulty")) == sorted(failed)
        assert len(failed) == 11  # of 20, with this seed
    finally:
        peers.sender.call("close_sender", "faulty")
