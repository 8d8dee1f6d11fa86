"""The same exact transfer with both KV caches in GPU memory (VRAM), for tcp and nixl."""

import random

import pytest
from conftest import TRANSPORTS, Peers
from fabric_actor import plan_to_wire
from test_transfer import ALL_LAYERS, SCHED, assert_landed, receiver_cache

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_gpu_kv_lands_exactly(transport):
    peers = Peers(transport, device="cuda")
    try:
        rng = random.Random(4)
        src, dst = rng.sample(range(64), 20), rng.sample(range(64), 20)
        plan = SCHED.plan("gpu", src, dst, num_cached_blocks=5)
        peers.receiver.call("expect", plan_to_wire(plan), 30.0)
        assert peers.sender.call("send", "main", plan_to_wire(plan), ALL_LAYERS) == 15 * 4 * 8192
        peers.sender.call("finish", "main", plan_to_wire(plan), b"gpu")
        assert peers.events(1, timeout_s=30) == [["complete", "gpu#0", b"gpu"]]
        assert peers.stats()["bytes_received"] == 15 * 4 * 8192
        assert_landed(receiver_cache(peers), dict(zip(dst[5:], src[5:], strict=True)))
    finally:
        peers.stop()
