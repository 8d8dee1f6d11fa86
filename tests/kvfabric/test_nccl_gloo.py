"""The ``nccl`` transport on its gloo backend: real processes, CPU tensors, exact blocks.

The transfer and failure tests of ``test_transfer.py`` / ``test_failures.py``
run again here over the nccl path (this module's ``module_peers`` overrides
the conftest one); the tests below add what is particular to pair groups.
"""

import random
import time

import pytest
from conftest import SENDER_SEED, Peers
from fabric_actor import Actor, plan_to_wire
from test_failures import (  # noqa: F401  (collected again over nccl)
    test_decode_cancel_fails_the_transfer_and_nothing_lands_after,
    test_identity_mismatch_is_refused_naming_the_field,
    test_killed_sender_fails_its_pending_transfers,
    test_plans_that_disagree_on_dst_blocks_fail_and_write_nothing,
    test_prefill_abort_mid_transfer_fails_it_and_stops_later_layers,
    test_timeout_fails_the_transfer_and_forgets_it,
    test_unexpected_finish_is_dropped,
    test_wrong_token_is_refused_with_its_reason,
)
from test_transfer import (  # noqa: F401
    ALL_LAYERS,
    BYTES_PER_BLOCK_LAYER,
    SCHED,
    assert_landed,
    receiver_cache,
    test_fully_cached_prompt_moves_no_bytes,
    test_interleaved_transfers_in_any_layer_order,
    test_layers_land_in_dst_blocks_and_bytes_are_counted,
    test_layers_without_finish_do_not_complete,
)

from pdserve.kvfabric import TRANSPORT_NAMES, get_transport
from pdserve.kvfabric.nccl import NcclTransport, backend_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def module_peers():
    peers = Peers("nccl")
    yield peers
    peers.stop()


def test_registered_by_name_and_backend_follows_the_device():
    import torch

    assert "nccl" in TRANSPORT_NAMES
    assert isinstance(get_transport("nccl"), NcclTransport)
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"


def test_two_senders_get_two_pair_groups(peers):
    """Each (prefill, decode) pair has its own group; both land exactly, bytes add up."""
    second = Actor()
    try:
        second.call("sender_init", SENDER_SEED)
        second.call("connect", "b", peers.address, "nccl")
        rng = random.Random(11)
        src, dst = rng.sample(range(64), 10), rng.sample(range(64), 10)
        plan_a = SCHED.plan("pair-a", src[:6], dst[:6], 0)
        plan_b = SCHED.plan("pair-b", src[6:], dst[6:], 0)
        before = peers.stats()["bytes_received"]
        for plan in (plan_a, plan_b):
            peers.receiver.call("expect", plan_to_wire(plan), 20.0)
        sent_a = peers.sender.call("send", "main", plan_to_wire(plan_a), ALL_LAYERS)
        sent_b = second.call("send", "b", plan_to_wire(plan_b), ALL_LAYERS)
        second.call("finish", "b", plan_to_wire(plan_b), b"B")
        peers.sender.call("finish", "main", plan_to_wire(plan_a), b"A")
        assert sorted(peers.events(2)) == [["complete", "pair-a#0", b"A"],
                                           ["complete", "pair-b#0", b"B"]]
        assert (sent_a, sent_b) == (6 * 4 * BYTES_PER_BLOCK_LAYER, 4 * 4 * BYTES_PER_BLOCK_LAYER)
        assert peers.stats()["bytes_received"] - before == 10 * 4 * BYTES_PER_BLOCK_LAYER
        assert peers.stats()["num_connections"] == 2
        assert_landed(receiver_cache(peers), dict(zip(dst, src, strict=True)))
    finally:
        second.stop()
    deadline = time.monotonic() + 5
    while peers.stats()["num_connections"] != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert peers.stats()["num_connections"] == 1
