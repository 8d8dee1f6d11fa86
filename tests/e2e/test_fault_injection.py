"""Fault matrix row 9: the ``fault_injection`` config knob corrupts a random fraction of
KV transfers on purpose (``kv_fault_rate``), under load on 1 prefill + 2 decode workers.

Each corrupted transfer is caught by the receiver's block digests: exactly the set of
requests the prefill worker corrupted is the set whose hand-off failed with a digest
mismatch, and each of them is retried as a local prefill (or errors); every request
that succeeds gives exactly the greedy tokens, and the four invariants hold.
"""

import json

import pytest

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

RATE = 0.35
NUM_REQUESTS = 16
INJECTED = r"\[prefill0\].*fault injection corrupted the KV of (\w+) \(layer (\d+), block (\d+)\)"
DETECTED = (r"\[decode\d\].*hand-off of (\w+) failed \(digest mismatch in layer (\d+), "
            r"block (\d+) .*\); prefilling locally")
FAILED = r"\[decode\d\].*hand-off of (\w+) failed"


@pytest.fixture(scope="module")
def cluster():
    s = start_cluster(fault_config(
        [{"name": "prefill0", "role": "prefill"}, {"name": "decode0", "role": "decode"},
         {"name": "decode1", "role": "decode"}],
        router={"request_timeout_s": 60.0},
        fault_injection={"kv_fault_rate": RATE, "kv_fault_seed": 11}))
    yield s
    stop_cluster(s)


def test_row9_injected_transfer_faults_are_each_detected_and_retried(cluster, expected):
    mark = log_marks(cluster)
    before = cluster.status()["routing"]["remote_prefill"]
    results = run_load(cluster, range(NUM_REQUESTS))
    ok = assert_exact_or_error(results, expected, timeout_s=60.0)
    routed = cluster.status()["routing"]["remote_prefill"] - before
    assert routed >= NUM_REQUESTS // 2  # most went through the fabric

    injected = {mt[1]: (int(mt[2]), int(mt[3]))
                for mt in log_matches(cluster, INJECTED, mark)}
    detected = {mt[1]: (int(mt[2]), int(mt[3]))
                for mt in log_matches(cluster, DETECTED, mark)}
    failed = {mt[1] for mt in log_matches(cluster, FAILED, mark)}
    assert injected, "the knob corrupted nothing"
    assert len(injected) < routed  # a fraction, not all
    assert detected == injected  # each one caught, at the very layer and block corrupted
    assert failed == set(injected)  # and no clean transfer failed
    assert ok >= NUM_REQUESTS - len(injected)  # the rest are exact; retried ones too
    check_invariants(cluster, {"prefill0", "decode0", "decode1"})
    print(json.dumps({"row9_requests": NUM_REQUESTS, "row9_through_fabric": routed,
                      "row9_corrupted": len(injected), "row9_exact": ok}))
