"""A receiver process stopped (SIGSTOP) mid-stream: the sender's ``send_timeout_s`` fails
the send instead of hanging, the connection is cut, and once the receiver is continued
(SIGCONT) every transfer that had frames on it fails (never completes) while the
receiver keeps serving new connections. The prefill worker's lease relies on this."""

import os
import signal
import time

import pytest
from conftest import SENDER_SEED
from fabric_actor import TOKEN, Actor, identity, make_cache, plan_to_wire
from test_transfer import ALL_LAYERS, SCHED

from pdserve.kvfabric import FabricPeerError, KVSender

pytestmark = pytest.mark.timeout(90)

NUM_PLANS = 48  # 48 transfers x 4 layers x 256 KiB = 48 MiB, far beyond socket buffers


def layers():
    cache = make_cache(SENDER_SEED)  # [L, 2, NB, B, Hkv, D]
    return [(cache[i, 0], cache[i, 1]) for i in range(cache.shape[0])]


def wait_events(receiver: Actor, count: int, timeout_s: float = 20.0) -> list:
    events: list = []
    deadline = time.monotonic() + timeout_s
    while len(events) < count and time.monotonic() < deadline:
        events += receiver.call("take_events")
        time.sleep(0.05)
    return events


def test_stopped_receiver_fails_the_send_within_the_timeout_then_its_transfers():
    receiver = Actor()
    try:
        address = receiver.call("receiver_init", "tcp")
        kv = layers()
        plans = [SCHED.plan(f"stop-{i}", list(range(32)), list(range(32, 64)), 0)
                 for i in range(NUM_PLANS)]
        for p in plans:
            receiver.call("expect", plan_to_wire(p), 60.0)
        sender = KVSender(address, TOKEN, identity(), "tcp", send_timeout_s=0.5)
        os.kill(receiver.proc.pid, signal.SIGSTOP)
        sent: list[str] = []
        try:
            t0 = time.monotonic()
            with pytest.raises(FabricPeerError, match=r"connection failed \(a frame did not "
                                                      r"leave within 0\.5 s\)"):
                for p in plans:
                    for i in ALL_LAYERS:
                        sender.send_layer(p, i, *kv[i])
                    sent.append(p.transfer_id)
            assert time.monotonic() - t0 < 5.0  # buffers fill, then one 0.5 s stall
            assert not sender.is_alive
            with pytest.raises(FabricPeerError):  # later calls fail at once
                sender.send_layer(plans[-1], 0, *kv[0])
        finally:
            os.kill(receiver.proc.pid, signal.SIGCONT)
        assert 0 < len(sent) < NUM_PLANS
        cut = plans[len(sent)].transfer_id  # the transfer whose send timed out
        events = wait_events(receiver, len(sent))
        events += wait_events(receiver, 1, timeout_s=1.0)  # the cut one, if it had frames
        failed = {tid: reason for kind, tid, reason in events if kind == "error"}
        assert len(failed) == len(events)  # nothing completed
        assert set(sent) <= set(failed) <= set(sent) | {cut}
        assert all("disconnected" in failed[tid] for tid in sent)
        untouched = [p.transfer_id for p in plans if p.transfer_id not in failed]
        for tid in untouched:  # never saw a frame: still expected until cancelled
            assert receiver.call("cancel", tid) is True
        assert len(wait_events(receiver, len(untouched))) == len(untouched)
        assert receiver.call("receiver_stats")["num_pending"] == 0

        # the receiver still serves: a new connection lands a transfer exactly
        plan = SCHED.plan("after", [1, 2], [40, 41], 0)
        receiver.call("expect", plan_to_wire(plan), 10.0)
        with KVSender(address, TOKEN, identity(), "tcp", send_timeout_s=0.5) as again:
            for i in ALL_LAYERS:
                again.send_layer(plan, i, *kv[i])
            again.finish(plan, b"ok")
            assert wait_events(receiver, 1) == [["complete", "after#0", b"ok"]]
        sender.close()
    finally:
        receiver.stop()
