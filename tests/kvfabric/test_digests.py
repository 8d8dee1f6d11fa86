"""Block digests, seals and the fault knob: pure functions, exact values."""

import numpy as np
import pytest
import torch

from pdserve.kvfabric import TransferPlan
from pdserve.kvfabric.digests import (
    ALGO_CRC32,
    ALGO_WSUM,
    BlockDigests,
    DigestError,
    block_digests,
    cache_block_digests,
    check_finish_mac,
    decode_finish_aux,
    decode_layer_aux,
    encode_finish_aux,
    encode_layer_aux,
    finish_aux_size,
    finish_mac,
    layer_aux_size,
    mac_key,
)
from pdserve.kvfabric.faults import ENV_FAULT_RATE, FaultInjector, flip_byte, flip_digest
from pdserve.kvfabric.frames import (
    BEGIN,
    FINISH,
    HELLO,
    LAYER,
    ProtocolError,
    VersionMismatch,
    decode_header,
    encode_header,
    split_ids_length,
)

KEY = mac_key("cluster-secret")


def rows(seed: int, m: int = 6, width: int = 4096) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (m, width), dtype=torch.uint8, generator=g)  # [m, bpb]


@pytest.mark.parametrize("algo", [ALGO_CRC32, ALGO_WSUM])
def test_every_single_byte_change_swap_and_zeroed_tail_is_seen(algo):
    base = rows(1)
    ref = block_digests(algo, base).values
    assert len(ref) == 6 and len(set(ref)) == 6
    for pos in (0, 1, 2, 3, 1000, 2047, 4095):
        for delta in (1, 0x80, 0xFF):
            bad = base.clone()
            bad[4, pos] ^= delta
            got = block_digests(algo, bad).values
            assert [i for i in range(6) if got[i] != ref[i]] == [4]
    swapped = base.clone()
    swapped[2, 0:4], swapped[2, 8:12] = base[2, 8:12], base[2, 0:4]  # two int32 words
    assert block_digests(algo, swapped).values[2] != ref[2]
    tail = base.clone()
    tail[1, 3000:] = 0
    assert block_digests(algo, tail).values[1] != ref[1]


def test_wsum_is_exact_over_chunks_and_odd_widths():
    wide = rows(2, m=3, width=4 * 40000)  # 40000 int32 words: three chunks, padded
    ref = block_digests(ALGO_WSUM, wide).values
    assert all(0 <= v < 2**31 - 1 for v in ref)
    bad = wide.clone()
    bad[0, 4 * 39999] ^= 1  # the last word of the last, padded chunk
    assert block_digests(ALGO_WSUM, bad).values[0] != ref[0]
    odd = rows(3, m=2, width=4097)  # not a multiple of 4: byte words
    assert block_digests(ALGO_WSUM, odd) == block_digests(ALGO_WSUM, odd.clone())
    assert block_digests(ALGO_WSUM, rows(3, m=0)) == BlockDigests(ALGO_WSUM, ())


@pytest.mark.gpu
def test_wsum_agrees_between_gpu_and_cpu():
    base = rows(4, m=8, width=4 * 70000)
    assert block_digests(ALGO_WSUM, base.cuda()) == block_digests(ALGO_WSUM, base)


def test_cache_block_digests_equal_those_of_the_packed_layer():
    k, v = torch.randn(9, 16, 2, 8), torch.randn(9, 16, 2, 8)  # [NB, B, Hkv, D]
    ids = torch.tensor([7, 2, 5])
    packed = torch.stack([k[ids], v[ids]])  # [2, n, B, Hkv, D]
    want = block_digests(ALGO_CRC32, packed.reshape(6, -1).view(torch.uint8))
    assert cache_block_digests(ALGO_CRC32, k, v, ids) == want


def test_layer_seal_binds_digests_to_the_frame():
    plan = TransferPlan("r#1", "r", 1, None, (4, 5), 2)
    head = encode_header(LAYER, 4096, plan, 1, layer_aux_size(2))
    digests = BlockDigests(ALGO_CRC32, (1, 2, 3, 4))
    aux = encode_layer_aux(KEY, head, digests)
    assert len(aux) == layer_aux_size(2) == 8 + 16 + 16
    assert decode_layer_aux(KEY, head, aux) == digests
    other_layer = encode_header(LAYER, 4096, plan, 0, layer_aux_size(2))
    other_attempt = encode_header(LAYER, 4096, TransferPlan("r#1", "r", 2, None, (4, 5), 2), 1,
                                  layer_aux_size(2))
    tampered = aux[:8] + bytes([aux[8] ^ 1]) + aux[9:]
    for key, header, data in [(KEY, other_layer, aux), (KEY, other_attempt, aux),
                              (mac_key("other-token"), head, aux), (KEY, head, tampered)]:
        with pytest.raises(DigestError) as info:
            decode_layer_aux(key, header, data)
        assert str(info.value).startswith("digest seal does not match the frame")
    with pytest.raises(DigestError):
        decode_layer_aux(KEY, head, aux[:10])


def test_finish_seal():
    plan = TransferPlan("r#0", "r", 0, None, (1,), 2)
    head = encode_header(FINISH, 3, plan, aux_nbytes=16)
    mac = finish_mac(KEY, head, b"abc")
    assert check_finish_mac(KEY, head, b"abc", mac) is None
    assert check_finish_mac(KEY, head, b"abd", mac) == (
        "finish frame seal does not match (replayed, rewritten or corrupted)")
    assert check_finish_mac(KEY, head, b"abc", b"") is not None


def test_begin_frame_round_trips_with_the_plans_ids():
    plan = TransferPlan("b#2", "b", 2, (1, 2), (7, 8), 4)
    head = encode_header(BEGIN, 0, plan)
    h = decode_header(head[:34], head[34:])
    assert (h.kind, h.transfer_id, h.request_id, h.attempt, h.nbytes, h.aux_nbytes) == (
        BEGIN, "b#2", "b", 2, 0, 0)


def test_frames_of_another_protocol_version_are_refused():
    head = bytearray(encode_header(HELLO, 0))
    head[5] = 0  # version 1 had a zero pad byte here
    with pytest.raises(VersionMismatch) as info:
        decode_header(bytes(head[:34]), b"")
    assert str(info.value) == "KV protocol version mismatch: peer 1, ours 3"
    assert split_ids_length(bytes(head[:34])) == 0
    assert issubclass(VersionMismatch, ProtocolError)


def test_fault_knob_picks_transfers_reproducibly_and_records_them(monkeypatch):
    plans = [TransferPlan(f"t{i}#0", f"t{i}", 0, (1, 2), (3, 4), 4) for i in range(40)]

    def run(injector):
        picks = {}
        for p in plans:
            for layer in range(4):
                b = injector.block_to_corrupt(p, layer)
                if b is not None:
                    picks[p.transfer_id] = (layer, b)
        return picks

    picks = run(FaultInjector(0.5, seed=3))
    inj = FaultInjector(0.5, seed=3)
    assert run(inj) == picks == dict(inj.injected)
    assert 10 < len(picks) < 30
    assert all(0 <= layer < 4 and 0 <= b < 4 for layer, b in picks.values())
    assert run(FaultInjector(0.0, seed=3)) == {}
    assert FaultInjector.from_knob(0.0, None) is None
    monkeypatch.delenv(ENV_FAULT_RATE, raising=False)
    assert FaultInjector.from_knob(None, None) is None
    monkeypatch.setenv(ENV_FAULT_RATE, "0.25")
    assert FaultInjector.from_knob(None, 1).rate == 0.25
    with pytest.raises(ValueError):
        FaultInjector(1.5)


def test_flips_change_exactly_one_block():
    r = rows(5, m=4, width=64)
    before = r.clone()
    flip_byte(r, 2)
    assert [i for i in range(4) if not torch.equal(r[i], before[i])] == [2]
    d = BlockDigests(ALGO_CRC32, (5, 6, 7))
    assert flip_digest(d, 1) == BlockDigests(ALGO_CRC32, (5, 7, 7))


def test_finish_aux_carries_every_layers_digests_under_one_seal():
    """The cuda_ipc FINISH: layers' digests in layer order, sealed with header and payload."""
    plan = TransferPlan("t#0", "t", 0, (1, 2), (5, 6), 3)
    values = np.array([[10 * i + j for j in range(1, 5)] for i in range(3)], dtype=np.int64)
    values[2, 3] = 2**32 - 1  # the widest digest survives
    header = encode_header(FINISH, 2, plan, aux_nbytes=finish_aux_size(12))
    aux = encode_finish_aux(KEY, header, b"ok", ALGO_WSUM, values)
    assert len(aux) == finish_aux_size(12) == 8 + 4 * 12 + 16
    algo, got = decode_finish_aux(KEY, header, b"ok", aux, 3)
    assert algo == ALGO_WSUM and got.dtype == np.uint32 and got.tolist() == values.tolist()
    with pytest.raises(DigestError, match="digest seal does not match"):
        decode_finish_aux(KEY, header, b"no", aux, 3)  # another payload
    with pytest.raises(DigestError, match="digest seal does not match"):
        decode_finish_aux(mac_key("other"), header, b"ok", aux, 3)
    with pytest.raises(DigestError, match="12 block digests do not split into 5 layers"):
        decode_finish_aux(KEY, header, b"ok", aux, 5)
    with pytest.raises(DigestError, match="too short"):
        decode_finish_aux(KEY, header, b"ok", aux[:10], 3)
    empty = encode_finish_aux(KEY, header, b"ok", ALGO_WSUM, np.zeros(0, dtype=np.uint32))
    assert decode_finish_aux(KEY, header, b"ok", empty, 3)[1].shape == (3, 0)
