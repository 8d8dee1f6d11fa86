"""The pure pair selector on hand-built snapshots: exact choices and exact terms.

Cost model of these tests (block size 4)::

    prefill(n)   = 0.01 s per token          (no step cost, no attention term)
    decode(b, c) = 0.02 + 0.001 b            (no context term)
    transfer(k)  = 0.004 s per block         (4 tokens x 100 B / 1e5 B/s)

The request: 40 prompt tokens (10 blocks), 10 output tokens.
"""

import math

import pytest

from pdserve.router.cost_model import CostModel
from pdserve.router.selector import Overrides, RequestView, WorkerView, candidates, select

COST = CostModel(prefill_step_s=0.0, prefill_token_s=0.01, prefill_attn_s=0.0,
                 decode_step_s=0.02, decode_seq_s=0.001, decode_ctx_s=0.0,
                 kv_bytes_per_token=100, block_size=4, transfer_latency_s=0.0,
                 bandwidth_bytes_s=1e5, prefill_chunk_tokens=1000)
REQ = RequestView(num_prompt_tokens=40, max_tokens=10)


def cluster(p0_cached=8, p0_queue=0, d1_cached=0, d1_free=1 << 30):
    return (WorkerView("p0", "prefill", num_cached_blocks=p0_cached,
                       num_queued_prefill_tokens=p0_queue),
            WorkerView("p1", "prefill"),
            WorkerView("d0", "decode", num_running=2),
            WorkerView("d1", "decode", num_cached_blocks=d1_cached, num_free_blocks=d1_free))


def test_cache_holder_prefills_for_the_idle_decoder_with_exact_terms():
    choice = select(REQ, cluster(), COST)
    assert choice.num_candidates == 6
    b = choice.best
    assert (b.prefill_id, b.decode_id, b.kind) == ("p0", "d1", "remote_prefill")
    assert b.num_cached_tokens == 32
    assert b.queue_s == 0.0
    assert b.compute_s == pytest.approx(0.08, abs=1e-12)
    assert b.transfer_s == pytest.approx(0.04, abs=1e-12)
    assert b.ttft_s == pytest.approx(0.12, abs=1e-12)
    assert b.tpot_s == pytest.approx(0.021, abs=1e-12)
    assert b.cost == pytest.approx(0.12 + 10 * 0.021, abs=1e-12)
    assert b.formula() == ("p0->d1: ttft 120.00ms = queue 0.00 + compute 80.00 + transfer "
                           "40.00; tpot 21.00ms; cost 0.3300s; cached 32 tokens")


def test_every_candidate_is_scored():
    got = {(c.prefill_id, c.decode_id): round(c.cost, 9) for c in candidates(REQ, cluster(),
                                                                            COST)}
    # a local prefill also pays its compute once per sequence of the batch, plus one
    assert got == {(None, "d0"): round(0.022 + 0.4 + 10 * 0.023 + 0.4 * 3, 9),
                   ("p0", "d0"): round(0.08 + 0.04 + 10 * 0.023, 9),
                   ("p1", "d0"): round(0.4 + 0.04 + 10 * 0.023, 9),
                   (None, "d1"): round(0.4 + 10 * 0.021 + 0.4, 9),
                   ("p0", "d1"): round(0.12 + 10 * 0.021, 9),
                   ("p1", "d1"): round(0.44 + 10 * 0.021, 9)}


def test_prompt_mostly_cached_on_a_decoder_is_prefilled_there():
    b = select(REQ, cluster(d1_cached=9), COST).best
    assert (b.prefill_id, b.decode_id, b.kind) == (None, "d1", "local_prefill")
    assert b.num_cached_tokens == 36
    assert b.ttft_s == pytest.approx(0.04, abs=1e-12) and b.transfer_s == 0.0


def test_full_cache_hit_still_computes_the_last_token():
    b = select(REQ, cluster(d1_cached=10), COST).best
    assert (b.prefill_id, b.decode_id, b.num_cached_tokens) == (None, "d1", 39)
    assert b.compute_s == pytest.approx(0.01, abs=1e-12)


def test_a_queue_on_the_cache_holder_sends_the_prompt_elsewhere():
    b = select(REQ, cluster(p0_queue=100), COST).best
    # p0->d1 would be 1.0 queue + 0.12 + 0.21; p1->d1 0.44 + 0.21; local d1 0.61 + 0.4
    assert (b.prefill_id, b.decode_id) == ("p1", "d1")
    assert b.cost == pytest.approx(0.65, abs=1e-12)
    # without the interference term the local prefill would win
    b = select(REQ, cluster(p0_queue=100), COST, local_weight=0.0).best
    assert (b.prefill_id, b.decode_id, b.cost) == (None, "d1", pytest.approx(0.61, abs=1e-12))


def test_slo_and_feasibility():
    tight = select(RequestView(40, 10, ttft_slo_s=0.1), cluster(), COST)
    assert not tight.meets_slo and (tight.prefill_id, tight.decode_id) == ("p0", "d1")
    ok = select(RequestView(40, 10, ttft_slo_s=0.2, tpot_slo_s=0.021), cluster(), COST)
    assert ok.meets_slo and (ok.prefill_id, ok.decode_id) == ("p0", "d1")
    # tpot target only d1 meets: d0's batch of 3 is 0.023
    only_d1 = select(RequestView(40, 10, tpot_slo_s=0.022), cluster(), COST)
    assert only_d1.decode_id == "d1"
    # d1 lacks the 10 + 1 blocks: only d0 is feasible
    short = select(REQ, cluster(d1_free=10), COST)
    assert (short.prefill_id, short.decode_id) == ("p0", "d0") and short.best.feasible


def test_overrides():
    assert select(REQ, cluster(), COST, Overrides(prefill="local")).best.kind == "local_prefill"
    assert select(REQ, cluster(), COST, Overrides(prefill="local")).decode_id == "d1"
    pinned = select(REQ, cluster(), COST, Overrides(decode_worker="d0"))
    assert (pinned.prefill_id, pinned.decode_id, pinned.num_candidates) == ("p0", "d0", 3)
    p1 = select(REQ, cluster(d1_cached=9), COST, Overrides(prefill_worker="p1"))
    assert (p1.prefill_id, p1.decode_id) == ("p1", "d1")
    remote = select(REQ, cluster(d1_cached=9), COST, Overrides(prefill="remote"))
    assert (remote.prefill_id, remote.decode_id) == ("p0", "d1")
    assert select(REQ, cluster(), COST, Overrides(decode_worker="gone")) is None


def test_colocated_workers_only_prefill_locally():
    ws = (WorkerView("c0", "colocated", num_running=4), WorkerView("c1", "colocated"),
          WorkerView("p0", "prefill", num_cached_blocks=10))
    choice = select(REQ, ws, COST)
    assert choice.num_candidates == 2 and (choice.prefill_id, choice.decode_id) == (None, "c1")


class _Recorder:
    def __init__(self, pick: int) -> None:
        self.pick = pick
        self.weights = None

    def choices(self, pool, weights):
        self.weights = list(weights)
        return [pool[self.pick]]


def test_temperature_samples_with_softmax_weights_and_zero_is_argmin():
    rng = _Recorder(pick=0)
    choice = select(REQ, cluster(), COST, temperature=0.1, rng=rng)
    costs = [c.cost for c in candidates(REQ, cluster(), COST)]
    best = min(costs)
    assert rng.weights == [math.exp(-(c - best) / 0.1) for c in costs]
    assert (choice.prefill_id, choice.decode_id) == (None, "d0")  # what the rng picked
    never = _Recorder(pick=0)
    assert select(REQ, cluster(), COST, temperature=0.0, rng=never).decode_id == "d1"
    assert never.weights is None
