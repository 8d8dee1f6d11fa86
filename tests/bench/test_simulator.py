"""The cluster simulator on tiny traces: exact timings, hit rates and policy behaviour."""

import pytest

from pdserve.bench.simulator import (
    LRUCache,
    TraceRequest,
    hit_rate,
    load_trace,
    offered_load,
    pct,
    simulate,
)
from pdserve.router.cost_model import CostModel

# 1 s per block of prompt (block = 4 tokens), decode steps 0.1 s, transfers free
COST = CostModel(prefill_step_s=0.0, prefill_token_s=0.25, prefill_attn_s=0.0,
                 decode_step_s=0.1, decode_seq_s=0.0, decode_ctx_s=0.0,
                 kv_bytes_per_token=0, block_size=4, transfer_latency_s=0.0,
                 bandwidth_bytes_s=1.0, prefill_chunk_tokens=1 << 20)


def test_one_request_exact_timings():
    trace = [TraceRequest(0.0, 8, 3, (1, 2))]
    r = simulate(trace, COST, 1, 1, "round_robin")
    assert r["ttft_p50"] == 2.0  # 8 tokens * 0.25
    assert r["tpot_p50"] == pytest.approx(0.1)  # 2 more tokens, one step each
    # the default SLOs: ttft 2 s (met), tpot 0.05 s (missed)
    assert r["prefix_hit_rate"] == 0.0 and r["slo_attainment"] == 0.0


def test_shared_prefix_hits_on_the_worker_that_holds_it():
    trace = [TraceRequest(0.0, 16, 1, (1, 2, 3, 4)),
             TraceRequest(10.0, 16, 1, (9, 8, 7, 6)),
             TraceRequest(20.0, 16, 1, (1, 2, 3, 5))]
    pd = simulate(trace, COST, 2, 1, "pdserve")
    rr = simulate(trace, COST, 2, 1, "round_robin")
    # pdserve: the third request finds 3 of its 4 blocks (12 of 16 tokens)
    assert pd["prefix_hit_rate"] == 12 / 48
    assert rr["prefix_hit_rate"] == 12 / 48  # round robin lands on p0 again by luck
    rr3 = simulate(trace, COST, 3, 1, "round_robin")
    assert rr3["prefix_hit_rate"] == 0.0
    pd3 = simulate(trace, COST, 3, 1, "pdserve")
    assert pd3["prefix_hit_rate"] == 12 / 48
    assert pd3["optimal_hit_rate"] == 12 / 48


def test_cache_greedy_piles_up_and_the_joint_cost_does_not():
    # four requests at once sharing one block: "prefix" sends all to the holder
    trace = [TraceRequest(0.0, 4, 1, (1,))] + [
        TraceRequest(1.0, 40, 1, (1, 10 + i, 20 + i, 30 + i, 40 + i, 50 + i, 60 + i,
                                  70 + i, 80 + i, 90 + i)) for i in range(4)]
    greedy = simulate(trace, COST, 4, 4, "prefix")
    joint = simulate(trace, COST, 4, 4, "pdserve")
    assert greedy["ttft_p90"] == 36.0  # 9 s each, one after another on p0
    assert joint["ttft_p90"] == 10.0  # spread: the holder 9 s, the others 10 s at once


def test_pooled_and_optimal_hit_rates_and_load():
    trace = [TraceRequest(float(t), 8, 1, ids) for t, ids in
             enumerate([(1, 2), (3, 4), (1, 2), (3, 4)])]
    assert hit_rate(trace, None, 4) == (7 + 7) / 32  # the last token is always computed
    assert hit_rate(trace, 2, 4) == 0.0  # two blocks: each prompt evicts the other
    assert offered_load(trace, COST, 2, 1.0) == (4 * 2.0) / (2 * 3.0)
    assert offered_load(trace, COST, 2, 3.0) == (4 * 2.0) / (2 * 1.0)


def test_lru_and_percentiles():
    c = LRUCache(2)
    c.insert([1, 2])
    c.insert([1])  # touch 1: 2 is now the oldest
    c.insert([3])
    assert c.prefix([1, 3]) == 2 and c.prefix([2]) == 0
    assert pct([1.0, 2.0, 3.0, 4.0], 50) == 2.0 and pct([1.0, 2.0, 3.0, 4.0], 90) == 4.0
    assert pct([], 90) == 0.0


def test_traces_load(tmp_path):
    j = tmp_path / "t.jsonl"
    j.write_text('{"timestamp": 1500, "input_length": 600, "output_length": 0, '
                 '"hash_ids": [4, 5]}\n')
    assert load_trace(str(j)) == [TraceRequest(1.5, 600, 1, (4, 5))]
    c = tmp_path / "t.csv"
    c.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.6805900,1000,44\n2023-11-16 18:15:47.1805900,10,2\n")
    a, b = load_trace(str(c), 512)
    assert (a.arrival_s, a.input_len, a.output_len, len(a.hash_ids)) == (0.0, 1000, 44, 2)
    assert b.arrival_s == pytest.approx(0.5) and len(b.hash_ids) == 1
    assert not set(a.hash_ids) & set(b.hash_ids)
