"""The receiver times each transfer (tcp): ``on_timing`` gets its exact KV bytes and the
seconds its layers spent on the wire, once, just before ``on_complete``; never on failure.
The decode worker reports these per prefill peer for the router's bandwidth fit."""

import threading

import pytest
from conftest import SENDER_SEED
from fabric_actor import TOKEN, identity, make_cache
from test_transfer import ALL_LAYERS, BYTES_PER_BLOCK_LAYER, SCHED

from pdserve.kvfabric import KVReceiver, KVSender

pytestmark = pytest.mark.timeout(60)


def test_on_timing_reports_bytes_and_wire_seconds_before_completion():
    src_cache, dst_cache = make_cache(SENDER_SEED), make_cache(None)
    src = [(src_cache[i, 0], src_cache[i, 1]) for i in range(src_cache.shape[0])]
    dst = [(dst_cache[i, 0], dst_cache[i, 1]) for i in range(dst_cache.shape[0])]
    events: list = []
    done = threading.Event()
    with KVReceiver(dst, identity(), TOKEN, "tcp") as receiver:
        sender = KVSender(receiver.address, TOKEN, identity(), "tcp")
        try:
            ok = SCHED.plan("t-ok", None, list(range(20, 32)), num_cached_blocks=3)
            bad = SCHED.plan("t-bad", None, list(range(40, 44)), num_cached_blocks=0)
            receiver.expect(ok, lambda p, payload: (events.append(("complete", p.request_id)),
                                                    done.set()),
                            lambda p, why: events.append(("error", p.request_id)),
                            timeout_s=10.0,
                            on_timing=lambda p, nbytes, s: events.append(
                                ("timing", p.request_id, nbytes, s)))
            receiver.expect(bad, lambda p, payload: events.append(("complete", p.request_id)),
                            lambda p, why: events.append(("error", p.request_id)),
                            timeout_s=10.0,
                            on_timing=lambda p, nbytes, s: events.append(("timing", "bad")))
            send = SCHED.plan_from_suffix("t-ok", list(range(12)), 3, ok.dst_block_ids)
            for i in ALL_LAYERS:
                sender.send_layer(send, i, *src[i])
            sender.finish(send, b"done")
            assert done.wait(10.0)
            assert receiver.cancel("t-bad#0")
        finally:
            sender.close()
    (kind, rid, nbytes, wire_s), *rest = events
    assert (kind, rid, nbytes) == ("timing", "t-ok", 9 * 4 * BYTES_PER_BLOCK_LAYER)
    assert nbytes == receiver.bytes_received == 294912
    assert 0.0 < wire_s < 5.0
    assert rest == [("complete", "t-ok"), ("error", "t-bad")]
