"""Fault matrix rows 6 and 7: the prefill and the decode worker in separate network
namespaces joined by a veth pair (``netns.py``), the router in the root namespace.

Row 6: the P<->D link is cut while hand-offs are in flight: each in-flight hand-off
fails within the transfer time-out and its request is prefilled locally (exact tokens);
the prefill worker, whose decode peer can no longer renew its leases, frees every block
while the link is still down. After the link is healed, new requests go through the
fabric again (no fallback) without any worker restarting.
Row 7: the link degraded (netem delay, loss, duplication, reordering; a tbf-shaped
slow link): every request still gives exactly the greedy tokens through the fabric, and
no hand-off fails but by the time-out (never a digest or framing error).

Needs root (CAP_NET_ADMIN): skipped with the reason where 'ip netns add' fails; the
netem case is skipped where the kernel lacks sch_netem.
"""

import concurrent.futures
import json
import time

import pytest

from tests.e2e import netns
from tests.e2e.faults import (
    LONG_MAX_TOKENS,
    assert_exact_or_error,
    check_invariants,
    fault_config,
    log_marks,
    log_matches,
    long_prompt,
    run_load,
    start_cluster,
    stop_cluster,
    wait_until,
    workers,
)

WHY_NOT = netns.unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"network namespaces: {WHY_NOT}")

TRANSFER_TIMEOUT_S = 10.0  # generous: one CPU step can take seconds on a shared box
LEASE_S = 2.0
FAILED = r"\[decode0\].*hand-off of (\w+) failed \((.*)\); prefilling locally"


@pytest.fixture(scope="module")
def topology():
    topo = netns.Topology.for_this_process()
    topo.setup()
    yield topo
    topo.teardown()


@pytest.fixture(scope="module")
def cluster(topology):
    t = topology
    s = start_cluster(fault_config(
        [{"name": "prefill0", "role": "prefill", "host": t.prefill_host,
          "launch_prefix": t.launch_prefix(t.ns_prefill)},
         {"name": "decode0", "role": "decode", "host": t.decode_host,
          "launch_prefix": t.launch_prefix(t.ns_decode)}],
        router={"host": t.router_host, "request_timeout_s": 60.0},
        kv_lease_s=LEASE_S, kv_transfer_timeout_s=TRANSFER_TIMEOUT_S))
    yield s
    stop_cluster(s)


def remote(cluster) -> int:
    return cluster.status()["routing"]["remote_prefill"]


def wait_clean_handoff(cluster, expected, timeout_s: float) -> float:
    """Seconds until one request goes through the fabric without a fallback."""
    t0 = time.monotonic()
    while True:
        mark, before = log_marks(cluster), remote(cluster)
        assert assert_exact_or_error(run_load(cluster, [0]), expected) == 1
        if remote(cluster) == before + 1 and not log_matches(cluster, FAILED, mark):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout_s, "the fabric did not recover"


def assert_only_timeouts(cluster, mark: int) -> None:
    """No hand-off since ``mark`` failed but by the time-out (a step can take seconds on a
    busy 2-core box): the link never made the fabric see bad or cut KV."""
    reasons = [mt[2] for mt in log_matches(cluster, FAILED, mark)]
    assert all(r == f"timed out after {TRANSFER_TIMEOUT_S:g} s" for r in reasons), reasons


def test_workers_run_in_their_namespaces(cluster, topology, expected):
    assert assert_exact_or_error(run_load(cluster, range(2)), expected) == 2
    by = workers(cluster)
    assert by["prefill0"]["request_address"].startswith(f"tcp://{topology.prefill_host}:")
    assert by["decode0"]["request_address"].startswith(f"tcp://{topology.decode_host}:")
    assert wait_clean_handoff(cluster, expected, 30) < 30


def test_row6_link_cut_fails_inflight_handoffs_in_time_and_heals(
        cluster, topology, expected, expected_long):
    pids = {n: w["pid"] for n, w in workers(cluster).items()}
    mark = log_marks(cluster)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    load = pool.submit(run_load, cluster, range(4), max_tokens=LONG_MAX_TOKENS,
                       make_prompt=long_prompt)
    try:
        wait_until(lambda: workers(cluster)["decode0"]["pending_transfers"] >= 1, 30,
                   "no hand-off in flight")
        topology.set_link(up=False)
        t_cut = time.monotonic()

        # the prefill worker's holds lapse: nothing renews them across the cut
        def prefill_idle() -> bool:
            w = workers(cluster)["prefill0"]
            return (w["free_blocks"] == w["total_blocks"] and w["running"] == 0
                    and w["waiting"] == 0)

        freed_s = wait_until(prefill_idle, 30, "prefill0 kept blocks across the cut")
        results = load.result(timeout=120)
        done_s = time.monotonic() - t_cut
        failures = dict((mt[1], mt[2]) for mt in log_matches(cluster, FAILED, mark))
        assert workers(cluster)["prefill0"]["healthy"]  # it still answers the router
    finally:
        topology.set_link(up=True)
        pool.shutdown(wait=False)
    t_heal = time.monotonic()
    # every request ends exact (its hand-off timed out and it was prefilled locally, or
    # it had landed before the cut); the in-flight ones failed within the time-out
    assert assert_exact_or_error(results, expected_long, timeout_s=60) == 4
    assert failures, "no hand-off was in flight at the cut"
    assert all(reason == f"timed out after {TRANSFER_TIMEOUT_S:g} s"
               or "prefill peer" in reason for reason in failures.values()), failures
    assert done_s < TRANSFER_TIMEOUT_S + 40  # time-out + local prefill on a busy box

    # healed: the fabric carries requests again, nothing restarted
    recover_s = wait_clean_handoff(cluster, expected, 60)
    mark, before = log_marks(cluster), remote(cluster)
    assert assert_exact_or_error(run_load(cluster, range(4)), expected) == 4
    assert remote(cluster) == before + 4
    assert_only_timeouts(cluster, mark)
    assert {n: w["pid"] for n, w in workers(cluster).items()} == pids
    check_invariants(cluster, {"prefill0", "decode0"})
    print(json.dumps({"row6_inflight_failed": len(failures),
                      "row6_prefill_freed_s": round(freed_s, 2),
                      "row6_requests_done_s": round(done_s, 2),
                      "row6_recovered_after_heal_s": round(recover_s, 2),
                      "row6_since_heal_s": round(time.monotonic() - t_heal, 2)}))


DEGRADED = [
    pytest.param("netem", ["delay", "20ms", "5ms", "loss", "2%", "duplicate", "2%",
                           "reorder", "25%", "50%"], id="netem"),
    pytest.param("tbf", ["rate", "100mbit", "burst", "64kb", "latency", "100ms"],
                 id="tbf-slow-link"),
]


@pytest.mark.parametrize("kind,args", DEGRADED)
def test_row7_degraded_link_outputs_stay_exact(cluster, topology, expected, kind, args):
    why = netns.qdisc_unavailable(kind, args)
    if why is not None:
        pytest.skip(why)
    wait_clean_handoff(cluster, expected, 60)  # after row 6 the fabric may be reconnecting
    topology.shape_link(kind, args)
    try:
        mark, before = log_marks(cluster), remote(cluster)
        results = run_load(cluster, range(8))
        assert assert_exact_or_error(results, expected) == 8
        assert remote(cluster) == before + 8
        assert_only_timeouts(cluster, mark)
    finally:
        topology.shape_link(None)
    check_invariants(cluster, {"prefill0", "decode0"})
