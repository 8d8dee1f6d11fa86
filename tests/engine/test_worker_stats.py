"""The counters a worker's heartbeat reports: prompts started and their prefix-cache
hits (StepStats, on the real engine), and KV transfers landed per peer (KVPeerTotals)."""

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.worker_runtime import KVPeerTotals, StepStats


def run(engine: LLMEngine, stats: StepStats, rid: str, prompt: list[int]) -> None:
    engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=3,
                                                   ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
        stats.add(engine.current_schedule, 0.01)


def test_prefill_requests_and_prefix_hits_are_counted_once_per_prompt():
    engine = LLMEngine(EngineConfig(model="smollm2-135m", num_blocks=64,
                                    max_num_batched_tokens=32))
    stats = StepStats()
    first = list(range(500, 570))  # 70 tokens: 3 chunks of <= 32, 4 full blocks
    run(engine, stats, "a", first)
    assert (stats.prefill_requests, stats.prefix_cached_tokens, stats.prefill_tokens) == (
        1, 0, 70)
    assert (stats.prefill_steps, stats.decode_steps) == (3, 2)
    run(engine, stats, "b", first[:66] + [7, 8, 9])  # shares 66 tokens: 4 blocks cached
    assert (stats.prefill_requests, stats.prefix_cached_tokens, stats.prefill_tokens) == (
        2, 64, 70 + 5)
    f = stats.fields()
    assert (f["prefill_requests"], f["prefix_cached_tokens"]) == (2, 64)


def test_kv_peer_totals_sum_per_peer_for_the_load_report():
    totals = KVPeerTotals()
    assert totals.fields() == {"kv_received": [], "kv_seconds": 0}
    totals.record("tcp://127.0.0.1:7001", 1000, 0.5)
    totals.record("tcp://127.0.0.1:7000", 300, 0.25)
    totals.record("tcp://127.0.0.1:7001", 24, 0.125)
    f = totals.fields()
    assert [(r.peer, r.num_transfers, r.bytes, r.seconds) for r in f["kv_received"]] == [
        ("tcp://127.0.0.1:7000", 1, 300, 0.25), ("tcp://127.0.0.1:7001", 2, 1024, 0.625)]
    assert f["kv_seconds"] == 0.875


def test_requests_held_for_a_transfer_are_unfinished_but_not_work():
    """A decode worker's loop waits (does not spin) while it only holds blocks for
    KV transfers; a landed transfer is work again."""
    engine = LLMEngine(EngineConfig(model="smollm2-135m", num_blocks=16))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    req = engine.reserve_for_transfer("t", list(range(500, 540)), params)
    assert req is not None and req.block_ids == [0, 1, 2]
    assert (engine.has_unfinished(), engine.has_work()) == (True, False)
    engine.complete_transfer("t", 7)
    assert (engine.has_unfinished(), engine.has_work()) == (True, True)
    engine.abort("t")
    assert (engine.has_unfinished(), engine.has_work()) == (False, False)
    assert engine.pool.num_free_blocks == 16
