"""The connector's scheduler half, the descriptors and the wire format: pure, in-process."""

import sys

import pytest

from pdserve.kvfabric import (
    FabricIdentity,
    FabricTransportUnavailable,
    KVConnectorScheduler,
    TransferPlan,
    get_transport,
)
from pdserve.kvfabric.frames import (
    LAYER,
    Hello,
    ProtocolError,
    decode_hello,
    dst_digest,
    encode_header,
    encode_msg,
    parse_notification,
)

SCHED = KVConnectorScheduler(num_layers=4)


def test_plan_moves_only_the_blocks_the_decode_side_lacks():
    plan = SCHED.plan("r", [7, 3, 9, 12, 40], [1, 2, 5, 8, 6], num_cached_blocks=2)
    assert plan == TransferPlan("r#0", "r", 0, (9, 12, 40), (5, 8, 6), 4)


def test_decode_side_plan_has_no_src_and_matches_the_prefill_side_plan():
    recv = SCHED.plan("r", None, [1, 2, 5, 8, 6], num_cached_blocks=2, attempt=3)
    send = SCHED.plan_from_suffix("r", [7, 3, 9, 12, 40], 2, [5, 8, 6], attempt=3)
    assert recv == TransferPlan("r#3", "r", 3, None, (5, 8, 6), 4)
    assert send == recv.with_src((9, 12, 40))


def test_nothing_cached_moves_everything_and_everything_cached_moves_nothing():
    assert SCHED.plan("a", [4, 5], [6, 7], 0).src_block_ids == (4, 5)
    empty = SCHED.plan("b", [4, 5], [6, 7], 2)
    assert (empty.src_block_ids, empty.dst_block_ids, empty.num_blocks) == ((), (), 0)


def test_num_blocks_to_move_counts_a_trailing_partial_block():
    assert KVConnectorScheduler.num_blocks_to_move(33, 16, 1) == 2
    assert KVConnectorScheduler.num_blocks_to_move(32, 16, 2) == 0
    assert KVConnectorScheduler.num_blocks_to_move(1, 16, 0) == 1


@pytest.mark.parametrize("call,message", [
    (lambda: SCHED.plan("r", [1, 2], [3, 4, 5], 0),
     "request r: prefill table has 2 blocks, decode table 3"),
    (lambda: SCHED.plan("r", None, [3, 4], 3), "request r: num_cached_blocks 3 outside 0..2"),
    (lambda: SCHED.plan_from_suffix("r", [1, 2, 3], 1, [9]),
     "request r: 2 blocks to send but 1 destination blocks"),
    (lambda: SCHED.plan("r", [1, 2], [3, 3], 0), "TransferPlan r#0: duplicate dst block ids"),
    (lambda: SCHED.plan("r", [1, -2], [3, 4], 0), "TransferPlan r#0: negative block id"),
])
def test_inconsistent_tables_are_rejected(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def ident(**over):
    fields = dict(model="m", block_size=16, dtype="float16", num_layers=2, num_kv_heads=2,
                  head_dim=64, hash_seed=0, hash_algorithm="blake2b-64")
    return FabricIdentity(**{**fields, **over})


def test_identity_mismatch_names_the_first_differing_field():
    assert ident().first_mismatch(ident()) is None
    assert ident(block_size=16).first_mismatch(ident(block_size=32)) == \
        "block_size mismatch: prefill 16, decode 32"
    assert ident(hash_seed=1, head_dim=8).first_mismatch(ident()) == \
        "head_dim mismatch: prefill 8, decode 64"
    assert ident().bytes_per_block == 16 * 2 * 64 * 2


def test_identity_from_kv_spec():
    import torch

    from pdserve.engine.kv_cache import KVCacheSpec

    spec = KVCacheSpec(num_layers=2, num_blocks=9, block_size=16, num_kv_heads=2, head_dim=64,
                       dtype=torch.float16)
    assert FabricIdentity.from_kv_spec("m", spec, 0, "blake2b-64") == ident()


def test_header_round_trips_through_a_nixl_notification():
    plan = SCHED.plan("req", [1, 2], [3, 4], 0, attempt=1)
    h, aux = parse_notification(encode_header(LAYER, 4096, plan, 3, aux_nbytes=3) + b"abc")
    assert (h.kind, h.transfer_id, h.request_id, h.layer, h.attempt, h.nbytes, aux) == \
        (LAYER, "req#1", "req", 3, 1, 4096, b"abc")
    assert h.dst_digest == dst_digest((3, 4)) != dst_digest((4, 3))
    with pytest.raises(ProtocolError):
        parse_notification(b"XXXX" + encode_header(LAYER, 1, plan, 0)[4:])
    with pytest.raises(ProtocolError) as info:  # aux cut short
        parse_notification(encode_header(LAYER, 1, plan, 0, aux_nbytes=4) + b"ab")
    assert str(info.value) == "notification carries 2 aux bytes, header says 4"


def test_hello_round_trips_without_pickle_and_rejects_garbage():
    hello = Hello(token="t", identity=ident(), transport="tcp")
    assert decode_hello(encode_msg(hello)) == hello
    with pytest.raises(ProtocolError):
        decode_hello(b"\x93garbage")


def test_transport_registry():
    assert get_transport("tcp").name == "tcp"
    with pytest.raises(ValueError) as info:
        get_transport("carrier-pigeon")
    assert str(info.value) == ("unknown KV transport 'carrier-pigeon'; "
                               "choose one of ['tcp', 'nixl', 'nccl', 'cuda_ipc']")


def test_missing_nixl_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nixl._api", None)
    monkeypatch.setitem(sys.modules, "nixl", None)
    with pytest.raises(FabricTransportUnavailable) as info:
        get_transport("nixl")
    assert "needs the 'nixl' package (pip install nixl)" in str(info.value)
    assert isinstance(info.value, ImportError)
