"""Fault matrix row 4: a decode worker stopped (SIGSTOP) past its lease on the blocks the
prefill worker holds for it, then continued (SIGCONT).

While it is stopped it renews nothing: the prefill worker's holds for it lapse and are
freed (its whole pool is free again while the decode worker is still stopped), the
router ends the stopped worker's requests with an error, and once it is continued its
late messages change nothing at the prefill worker; new requests then succeed with
exact tokens, and the four invariants hold.

The prefill worker is stalled (a fault-injection message) from before the load until
after the stop, so it cannot finish a hand-off before decode0 stops: every job it
received is granted at the end of the stall, its first push to the stopped peer blocks
for a lease, and the jobs still queued then lapse. (Without the stall a fast machine
could finish every hand-off between the last status poll and the stop.) The freeing is
judged only after prefill0 was seen holding blocks: its report from before the stall
shows a free pool too.
"""

import concurrent.futures
import json
import os
import signal
import time

import pytest

from pdserve import SamplingParams
from tests.e2e.faults import (
    LONG_MAX_TOKENS,
    assert_exact_or_error,
    check_invariants,
    fault_config,
    log_marks,
    log_matches,
    long_prompt,
    run_load,
    send_stall,
    start_cluster,
    stop_cluster,
    wait_until,
    workers,
)

LEASE_S = 1.5
HEARTBEAT_TIMEOUT_S = 3.0
NUM_LONG = 6  # enough prefill work that holds are still queued a lease after the stop
PREFILL_STALL_S = 6.0  # holds prefill0's inbox from before the load until after the stop
LAPSE = r"\[prefill0\].*prefill of (\w+) failed: lease lapsed: decode worker (\S+) did not renew"


@pytest.fixture(scope="module")
def cluster():
    s = start_cluster(fault_config(
        [{"name": "prefill0", "role": "prefill"}, {"name": "decode0", "role": "decode"}],
        router={"request_timeout_s": 60.0, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
                "loop_stall_s": 20.0},  # prefill0's stalled loop is not a fault here
        kv_lease_s=LEASE_S))
    yield s
    stop_cluster(s)


def test_row4_stopped_decode_lapses_its_leases_and_comes_back(cluster, expected,
                                                              reference_llm):
    assert assert_exact_or_error(run_load(cluster, range(2)), expected) == 2  # warm
    by = workers(cluster)
    decode, prefill = by["decode0"], by["prefill0"]
    mark = log_marks(cluster)

    # under load: long prompts queue at the stalled prefill worker, to be held for decode0
    send_stall(prefill["request_address"], PREFILL_STALL_S)
    t_stall = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    load = pool.submit(run_load, cluster, range(NUM_LONG), max_tokens=LONG_MAX_TOKENS,
                       make_prompt=long_prompt)
    wait_until(lambda: workers(cluster)["decode0"]["pending_transfers"] >= 1, 30,
               "decode0 never waited for a transfer")
    os.kill(decode["pid"], signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        # the stop came while prefill0 was still stalled (no hand-off could finish before)
        assert t_stop - t_stall < PREFILL_STALL_S - 1.0, t_stop - t_stall

        # back from the stall prefill0 holds blocks for decode0; the holds lapse and it
        # frees every block while decode0 sleeps
        def prefill_holds() -> bool:
            w = workers(cluster)["prefill0"]
            return w["free_blocks"] < w["total_blocks"] or w["running"] + w["waiting"] > 0

        def prefill_free() -> bool:
            w = workers(cluster)["prefill0"]
            return (w["free_blocks"] == w["total_blocks"] and w["running"] == 0
                    and w["waiting"] == 0 and bool(log_matches(cluster, LAPSE, since=mark)))

        wait_until(prefill_holds, 30, "prefill0 never held blocks for decode0")
        wait_until(prefill_free, 30, "prefill0 kept blocks for a stopped peer (or no hold "
                   "lapsed)")
        freed_s = time.monotonic() - t_stop
        lapsed = log_matches(cluster, LAPSE, since=mark)
        assert {mt[2] for mt in lapsed} == {decode["request_address"]}
        assert len({mt[1] for mt in lapsed}) == len(lapsed)  # each hold lapsed once
        wait_until(lambda: not workers(cluster)["decode0"]["healthy"], 10,
                   "decode0 was not ejected")
        stopped_s = time.monotonic() - t_stop
        results = load.result(timeout=90)  # the router ended them: error, or done before
    finally:
        os.kill(decode["pid"], signal.SIGCONT)
        pool.shutdown(wait=False)
    t_cont = time.monotonic()
    ok = [(i, r) for i, r, _ in results if r.status_code == 200]
    if ok:  # only a request that finished before the stop may succeed, and exactly
        ref = reference_llm.chat([long_prompt(i) for i, _ in ok], SamplingParams(
            temperature=0, max_tokens=LONG_MAX_TOKENS), use_tqdm=False)
        for (_, r), o in zip(ok, ref, strict=True):
            assert r.json()["choices"][0]["message"]["content"] == o.text
    for _, r, elapsed in results:
        assert elapsed < 60 + 10
        if r.status_code != 200:
            assert r.status_code >= 500, r.text
            assert "decode worker decode0 stopped responding" in r.json()["error"]["message"]
    assert len(ok) < len(results)  # the stopped worker's requests ended with an error

    # continued: readmitted after its back-off, not restarted, and late messages from it
    # (renewals, aborts of lapsed holds) leave the prefill worker idle
    back_s = wait_until(lambda: workers(cluster)["decode0"]["healthy"], 40,
                        "decode0 was not readmitted")
    time.sleep(1.0)
    w = workers(cluster)
    assert w["decode0"]["pid"] == decode["pid"] and w["prefill0"]["pid"] == prefill["pid"]
    assert w["prefill0"]["running"] == 0 and w["prefill0"]["waiting"] == 0
    assert not log_matches(cluster, r"\[prefill0\].*(Traceback|Error:)", since=mark)

    results = run_load(cluster, range(4))
    assert assert_exact_or_error(results, expected) == 4  # new requests succeed
    check_invariants(cluster, {"prefill0", "decode0"})
    print(json.dumps({"row4_prefill_freed_s": round(freed_s, 2),
                      "row4_stopped_s": round(stopped_s, 2),
                      "row4_readmitted_s": round(back_s, 2),
                      "row4_lapsed_holds": len(lapsed),
                      "row4_since_cont_s": round(time.monotonic() - t_cont, 2)}))

