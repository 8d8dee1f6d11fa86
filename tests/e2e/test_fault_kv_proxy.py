"""Fault matrix row 8 through a live cluster: a TCP proxy between the prefill worker's KV
sender and the decode worker's receiver (tcp transport) corrupts, truncates or replays
KV frames. Every tampering is detected: the hand-off it touched fails with a reason that
names it and the request is prefilled locally on the decode worker, so it still gives
exactly the greedy tokens; never wrong tokens. Clean transfers through the same proxy
land without a fallback, and the four invariants hold.

The decode worker binds its receiver on a fixed port and advertises the proxy's
address instead (``kv_port`` / ``kv_advertise``), as behind a NAT or a sidecar.
"""

import re
import threading

import pytest

from pdserve.kvfabric.frames import FINISH, LAYER, FrameHeader
from tests.e2e.conftest import free_port
from tests.e2e.faults import (
    assert_exact_or_error,
    check_invariants,
    fault_config,
    log_marks,
    log_matches,
    run_load,
    start_cluster,
    stop_cluster,
)
from tests.kvfabric.mitm import Cut, Mitm

TAMPER_LAYER = 5
FAILED = r"\[decode0\].*hand-off of (\w+) failed \((.*)\); prefilling locally"


class Tamperer:
    """Tampers with layer ``TAMPER_LAYER`` of the next ``armed`` transfers, one way."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mode = "pass"
        self.armed = 0
        self.touched: list[str] = []  # request ids whose frames were tampered with
        self.old_frame: bytes | None = None  # a layer frame of an earlier transfer

    def arm(self, mode: str, count: int = 1) -> None:
        with self.lock:
            self.mode, self.armed, self.touched = mode, count, []

    def __call__(self, h: FrameHeader, frame: bytes):
        with self.lock:
            if h.kind == LAYER and h.layer == TAMPER_LAYER and self.old_frame is None:
                self.old_frame = frame  # kept from the first transfer, for the old replay
            hit = (h.kind == LAYER and h.layer == TAMPER_LAYER and self.armed > 0
                   and h.request_id not in self.touched)
            if self.mode == "old-replay" and h.kind == FINISH and self.armed > 0:
                self.armed -= 1  # an old transfer's frame just before this FINISH
                self.touched.append(h.request_id)
                return [self.old_frame, frame]
            if not hit or self.mode not in ("flip", "truncate", "replay"):
                return [frame]
            self.armed -= 1
            self.touched.append(h.request_id)
        if self.mode == "flip":  # one byte of the first block's K
            at = len(frame) - h.nbytes + 100
            return [frame[:at] + bytes([frame[at] ^ 0x10]) + frame[at + 1:]]
        if self.mode == "truncate":  # half the frame, then the connection is cut
            return Cut(frame[:len(frame) - h.nbytes // 2])
        return [frame, frame]  # replay


@pytest.fixture(scope="module")
def proxied():
    kv_port = free_port()
    tamper = Tamperer()
    proxy = Mitm(f"127.0.0.1:{kv_port}", tamper, keep_frames=False)
    cluster = start_cluster(fault_config(
        [{"name": "prefill0", "role": "prefill"},
         {"name": "decode0", "role": "decode", "kv_port": kv_port,
          "kv_advertise": proxy.address}],
        router={"request_timeout_s": 60.0}, kv_lease_s=10.0))
    yield cluster, proxy, tamper
    stop_cluster(cluster)
    proxy.close()


@pytest.fixture
def cluster(proxied):  # named "cluster" so a failure report carries its output
    return proxied[0]


def handoff_failures(cluster, since: int) -> dict[str, str]:
    return {mt[1]: mt[2] for mt in log_matches(cluster, FAILED, since)}


def test_clean_transfers_pass_through_the_proxy(cluster, proxied, expected):
    _, proxy, tamper = proxied
    tamper.arm("pass", 0)
    mark = log_marks(cluster)
    before = cluster.status()["routing"]["remote_prefill"]
    assert assert_exact_or_error(run_load(cluster, range(4)), expected) == 4
    assert cluster.status()["routing"]["remote_prefill"] == before + 4
    assert handoff_failures(cluster, mark) == {}  # no fallback: the KV came through
    assert proxy.num_connections >= 1 and any(h.kind == LAYER for h, _ in proxy.frames)


@pytest.mark.parametrize("mode,reason", [
    ("flip", rf"digest mismatch in layer {TAMPER_LAYER}, block 0 \(K of dst block \d+, "),
    ("replay", rf"layer {TAMPER_LAYER} received twice \(replayed frame\)"),
    ("truncate", rf"truncated LAYER frame layer {TAMPER_LAYER} from prefill peer "),
], ids=["flip", "replay", "truncate"])
def test_tampered_frame_fails_its_handoff_and_the_request_stays_exact(
        cluster, proxied, expected, mode, reason):
    _, _, tamper = proxied
    tamper.arm(mode, 1)
    mark = log_marks(cluster)
    results = run_load(cluster, range(3))  # under load: three hand-offs at once
    assert assert_exact_or_error(results, expected) == 3  # fallbacks give exact tokens
    assert len(tamper.touched) == 1
    failures = handoff_failures(cluster, mark)
    rid = tamper.touched[0]
    assert rid in failures, failures
    assert _search(reason, failures[rid]), failures[rid]
    if mode != "truncate":  # only the tampered transfer failed; a cut may take others
        assert set(failures) == {rid}
    check_invariants(cluster, {"prefill0", "decode0"})


def test_replayed_old_frame_is_dropped_and_the_transfer_completes_exactly(
        cluster, proxied, expected):
    _, _, tamper = proxied
    if tamper.old_frame is None:  # run alone: let one transfer through to keep a frame
        tamper.arm("pass", 0)
        assert assert_exact_or_error(run_load(cluster, [4]), expected) == 1
    tamper.arm("old-replay", 1)
    mark = log_marks(cluster)
    assert assert_exact_or_error(run_load(cluster, [5]), expected) == 1
    assert len(tamper.touched) == 1
    assert handoff_failures(cluster, mark) == {}  # a stranger's frame cannot touch it
    check_invariants(cluster, {"prefill0", "decode0"})


def _search(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None
