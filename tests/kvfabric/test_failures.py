"""Refusals, aborts, cancels, time-outs, dead peers and malformed frames."""

import socket
import time

import pytest
import torch
from conftest import SENDER_SEED, Peers
from fabric_actor import POISON, TOKEN, Actor, RemoteError, identity, plan_to_wire
from test_transfer import ALL_LAYERS, SCHED, assert_landed, receiver_cache

from pdserve.kvfabric.digests import (
    ALGO_CRC32,
    MAC_SIZE,
    block_digests,
    encode_layer_aux,
    finish_mac,
    layer_aux_size,
    mac_key,
)
from pdserve.kvfabric.frames import (
    FINISH,
    HELLO,
    LAYER,
    FrameHeader,
    Hello,
    decode_welcome,
    dst_digest,
    encode_header,
    encode_msg,
    encode_raw_header,
    read_aux,
    read_control_payload,
    read_header,
)

pytestmark = pytest.mark.timeout(90)


def connect_error(peers, **kwargs) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        peers.sender.call("connect", "refused", peers.address, peers.transport, *kwargs.values())
    return info.value


def test_wrong_token_is_refused_with_its_reason(peers):
    err = connect_error(peers, token="not-the-cluster-token")
    assert err.kind == "FabricHandshakeError"
    assert err.message == f"KV receiver {peers.address} refused: cluster token mismatch"
    assert peers.stats()["num_connections"] == 1


@pytest.mark.parametrize("field,value,message", [
    ("block_size", 32, "block_size mismatch: prefill 32, decode 16"),
    ("hash_seed", 99, "hash_seed mismatch: prefill 99, decode 1234"),
    ("model", "other-model", "model mismatch: prefill other-model, decode test-model"),
    ("dtype", "bfloat16", "dtype mismatch: prefill bfloat16, decode float32"),
    ("hash_algorithm", "sha256", "hash_algorithm mismatch: prefill sha256, decode blake2b-64"),
])
def test_identity_mismatch_is_refused_naming_the_field(peers, field, value, message):
    err = connect_error(peers, token=TOKEN, identity_over={field: value})
    assert err.kind == "FabricHandshakeError"
    assert err.message == f"KV receiver {peers.address} refused: {message}"
    assert peers.stats()["num_connections"] == 1


def test_prefill_abort_mid_transfer_fails_it_and_stops_later_layers(peers):
    plan = SCHED.plan("ab", [10, 11, 12], [20, 21, 22], 0)
    peers.receiver.call("expect", plan_to_wire(plan), 10.0)
    peers.sender.call("send", "main", plan_to_wire(plan), [0, 1])
    peers.sender.call("abort", "main", plan_to_wire(plan))
    assert peers.events(1) == [["error", "ab#0",
                                "aborted by prefill side: aborted by the prefill side"]]
    assert peers.stats()["num_pending"] == 0
    with pytest.raises(RemoteError) as info:
        peers.sender.call("send", "main", plan_to_wire(plan), [2])
    assert info.value.kind == "FabricTransferCancelled"
    got = receiver_cache(peers)
    assert bool((got[2:] == POISON).all())  # layers 2 and 3 never landed


def send_until_cancelled(peers, plan, layer: int) -> RemoteError:
    """The sender learns of a cancel asynchronously: retry until it raises."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            peers.sender.call("send", "main", plan_to_wire(plan), [layer])
        except RemoteError as e:
            return e
        time.sleep(0.05)
    raise AssertionError("the sender never saw the cancel")


def test_decode_cancel_fails_the_transfer_and_nothing_lands_after(peers):
    plan = SCHED.plan("cx", [1, 2], [30, 31], 0)
    peers.receiver.call("expect", plan_to_wire(plan), 10.0)
    peers.sender.call("send", "main", plan_to_wire(plan), [0])
    assert peers.receiver.call("cancel", "cx#0") is True
    assert peers.events(1) == [["error", "cx#0", "cancelled by the decode side"]]
    assert peers.stats()["num_pending"] == 0
    assert peers.receiver.call("cancel", "cx#0") is False
    err = send_until_cancelled(peers, plan, 1)
    assert (err.kind, err.message) == ("FabricTransferCancelled",
                                      "transfer cx#0: cancelled by the decode side")
    if peers.transport == "tcp":  # an unexpected transfer's frame is dropped, not written
        peers.sender.call("send", "main", {**plan_to_wire(plan), "transfer_id": "cx2#0"}, [3])
    time.sleep(0.2)
    got = receiver_cache(peers)
    assert bool((got[1:] == POISON).all())  # only layer 0 may have landed


def test_timeout_fails_the_transfer_and_forgets_it(peers):
    plan = SCHED.plan("slow", [4], [40], 0)
    peers.receiver.call("expect", plan_to_wire(plan), 0.3)
    peers.sender.call("send", "main", plan_to_wire(plan), [0])
    assert peers.events(1) == [["error", "slow#0", "timed out after 0.3 s"]]
    assert peers.stats()["num_pending"] == 0
    err = send_until_cancelled(peers, plan, 1)
    assert err.message == "transfer slow#0: timed out after 0.3 s"


def test_unexpected_finish_is_dropped(peers):
    plan = SCHED.plan("nobody", [1], [2], 0)
    before = peers.stats()["num_dropped_frames"]
    peers.sender.call("finish", "main", plan_to_wire(plan), b"x")
    time.sleep(0.2)
    assert peers.stats()["num_dropped_frames"] == before + 1
    assert peers.events(0) == []


def test_plans_that_disagree_on_dst_blocks_fail_and_write_nothing(peers):
    peers.receiver.call("expect", plan_to_wire(SCHED.plan("dg", None, [5, 6], 0)), 10.0)
    # the first LAYER frame (cuda_ipc: the BEGIN frame) carries the dst digest
    peers.sender.call("send", "main", plan_to_wire(SCHED.plan("dg", [1, 2], [6, 5], 0)), [0])
    assert peers.events(1) == [["error", "dg#0",
                                "dst block ids differ between prefill and decode plans"]]
    assert peers.stats()["num_pending"] == 0
    if peers.transport == "tcp":  # one-sided writes (nixl, cuda_ipc) land before the check
        assert_landed(receiver_cache(peers), {})


def test_killed_sender_fails_its_pending_transfers(peers):
    victim = Actor()
    victim.call("sender_init", SENDER_SEED, peers.device)
    victim.call("connect", "v", peers.address, peers.transport)
    plan = SCHED.plan("kill", [3, 4], [50, 51], 0)
    peers.receiver.call("expect", plan_to_wire(plan), 30.0)
    landed = peers.stats()["bytes_received"] + 2 * 2 * 16 * 2 * 32 * 4
    victim.call("send", "v", plan_to_wire(plan), [0, 1])
    deadline = time.monotonic() + 5  # wait until the receiver knows who sends it
    while peers.stats()["bytes_received"] < landed and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.kill()
    [[kind, tid, reason]] = peers.events(1)
    assert (kind, tid) == ("error", "kill#0")
    assert reason.startswith("prefill peer 127.0.0.1:") and reason.endswith(" disconnected")
    stats = peers.stats()
    assert (stats["num_pending"], stats["num_connections"]) == (0, 1)


def test_sender_raises_once_the_receiver_died():
    peers = Peers("tcp")
    try:
        plan = SCHED.plan("dead", [1], [2], 0)
        peers.receiver.kill()
        deadline, err = time.monotonic() + 5.0, None
        while err is None and time.monotonic() < deadline:
            try:
                peers.sender.call("send", "main", plan_to_wire(plan), ALL_LAYERS)
            except RemoteError as e:
                err = e
        assert err is not None and err.kind == "FabricPeerError"
        assert err.message.startswith(f"KV receiver {peers.address}: ")
        assert peers.sender.call("sender_stats", "main")["is_alive"] is False
    finally:
        peers.sender.stop()


ONE_BLOCK_LAYER = 16 * 2 * 32 * 4  # K (or V) of one block in one layer, fp32


def sealed_layer_frame(plan, layer: int, payload: bytes, **over) -> bytes:
    """A LAYER frame as an honest sender would build it (digests + seal); ``over``
    replaces header fields after the seal was made (a rewritten frame)."""
    n = len(payload) // ONE_BLOCK_LAYER
    h = FrameHeader(LAYER, plan.transfer_id, plan.request_id, layer, plan.attempt,
                    dst_digest(plan.dst_block_ids), len(payload), layer_aux_size(n // 2))
    rows = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(n, -1)
    aux = encode_layer_aux(mac_key(TOKEN), encode_raw_header(h),
                           block_digests(ALGO_CRC32, rows))
    return encode_raw_header(FrameHeader(**{**h.__dict__, **over})) + aux + payload


def sealed_finish_frame(plan, payload: bytes) -> bytes:
    header = encode_header(FINISH, len(payload), plan, aux_nbytes=MAC_SIZE)
    return header + finish_mac(mac_key(TOKEN), header, payload) + payload


class RawPeer:
    """A hand-driven sender: handshakes properly, then writes any bytes it likes."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        hello = encode_msg(Hello(token=TOKEN, identity=identity(), transport="tcp"))
        self.sock.sendall(encode_header(HELLO, len(hello)) + hello)
        h = read_header(self.sock)
        read_aux(self.sock, h)
        welcome = decode_welcome(read_control_payload(self.sock, h))
        assert (welcome.ok, welcome.num_blocks) == (True, 64)

    def layer(self, plan, layer: int, payload: bytes, **over) -> None:
        self.sock.sendall(sealed_layer_frame(plan, layer, payload, **over))


@pytest.mark.parametrize("module_peers", ["tcp"], indirect=True)
def test_malformed_frames_fail_only_their_transfer(peers):
    raw = RawPeer(peers.address)
    one_block = 2 * 16 * 2 * 32 * 4
    bad_size, bad_layer, good, cut = (SCHED.plan(f"m{i}", None, dst, 0) for i, dst in
                                      enumerate([[1, 2], [3, 4, 5], [6], [7]]))
    for plan in (bad_size, bad_layer, good, cut):
        peers.receiver.call("expect", plan_to_wire(plan), 20.0)
    dropped = peers.stats()["num_dropped_frames"]

    raw.layer(bad_size, 0, bytes(3 * one_block))
    raw.layer(bad_layer, 9, bytes(3 * one_block))
    raw.layer(SCHED.plan("nobody", None, [9], 0), 0, bytes(one_block))
    data = torch.randn((4, 2, 1, 16, 2, 32), generator=torch.Generator().manual_seed(5))
    for layer in range(4):
        raw.layer(good, layer, data[layer].numpy().tobytes())
    raw.sock.sendall(sealed_finish_frame(good, b"ok"))
    assert sorted(peers.events(3)) == [
        ["complete", "m2#0", b"ok"],
        ["error", "m0#0", f"layer 0 has {3 * one_block} bytes, expected {2 * one_block}"],
        ["error", "m1#0", "layer 9 out of range 0..3"]]
    assert peers.stats()["num_dropped_frames"] == dropped + 1

    raw.layer(cut, 0, data[0].numpy().tobytes())
    raw.sock.sendall(b"GARBAGE-" * 5)
    [[kind, tid, reason]] = peers.events(1)
    assert (kind, tid) == ("error", "m3#0")
    assert reason.endswith(" sent a malformed frame (bad frame magic b'GARB')")
    rest = b""  # CANCEL frames for m0 and m1, then the end: the receiver closed this peer
    while chunk := raw.sock.recv(1 << 16):
        rest += chunk
    assert rest.count(b"PDKV") == 2
    assert peers.stats()["num_pending"] == 0

    got = receiver_cache(peers)
    assert torch.equal(got[:, :, 6], data[:, :, 0])
    assert torch.equal(got[0, :, 7], data[0, :, 0])
    untouched = [b for b in range(64) if b not in (6, 7)]
    assert bool((got[:, :, untouched] == POISON).all())
    # the receiver still serves its other peer
    plan = SCHED.plan("after", [8], [8], 0)
    peers.receiver.call("expect", plan_to_wire(plan), 10.0)
    peers.sender.call("send", "main", plan_to_wire(plan), ALL_LAYERS)
    peers.sender.call("finish", "main", plan_to_wire(plan), b"")
    assert peers.events(1) == [["complete", "after#0", b""]]
