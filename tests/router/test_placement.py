"""The Placer's bookkeeping around the selector: pending prefixes, queues, SLO 429s, metrics."""

import asyncio
from dataclasses import dataclass, field

import pytest

from pdserve.engine.block_hash import hash_block_chain
from pdserve.router.admission import SloConfig
from pdserve.router.dispatcher import DispatchError
from pdserve.router.placement import Placer
from pdserve.router.selector import Overrides


@dataclass
class W:
    worker_id: str
    role: str
    total_blocks: int = 1000
    report: dict = field(default_factory=dict)
    request_address: str = ""


class Reg:
    def __init__(self, *workers):
        self.workers = {w.worker_id: w for w in workers}

    def healthy(self, *roles):
        return [w for w in self.workers.values() if w.role in roles]

    def hash_params(self):
        return 16, 3


PROMPT = list(range(100, 164))  # 4 blocks


def placer(**kw) -> Placer:
    return Placer(Reg(W("p0", "prefill"), W("p1", "prefill"), W("d0", "decode")), "t",
                  "disaggregated", **kw)


def test_index_hit_then_pending_hit_then_release():
    async def go():
        pl = placer()
        pl.index.store("p1", hash_block_chain(PROMPT, 16, 3)[:3])
        a = await pl.place("a", PROMPT, 4)
        assert (a.prefill_id, a.decode_id, a.predicted.num_cached_tokens) == ("p1", "d0", 48)
        assert pl.queued["p1"] == 16 and pl.running["d0"] == 1
        # a second request with the same prompt: p1 will hold all 4 blocks (pending)
        b = await pl.place("b", PROMPT, 4, Overrides(prefill="remote"))
        assert (b.prefill_id, b.predicted.num_cached_tokens) == ("p1", 63)
        pl.first_delta(a, 48)
        pl.first_delta(a, 0)  # later deltas are ignored
        pl.done(a)
        pl.done(b)
        assert pl.queued["p1"] == 0 and pl.running["d0"] == 0
        assert pl.pending.index.workers() == ["d0", "p1"]
        assert pl.pending.index.match(hash_block_chain(PROMPT, 16, 3)) == {}
        text = "\n".join(pl.metrics_lines())
        assert "pdserve_router_prefix_predicted_cached_tokens_total 48" in text
        assert "pdserve_router_prefix_actual_cached_tokens_total 48" in text
        assert "pdserve_router_prefix_prediction_exact_total 1" in text
        assert 'pdserve_router_prefix_index_blocks{worker="p1"} 3' in text
    asyncio.run(go())


def test_slo_that_cannot_be_met_is_a_429_with_retry_after():
    async def go():
        pl = placer(slo=SloConfig(ttft_s=1e-9, max_waiting=0, min_retry_s=2.0))
        with pytest.raises(DispatchError) as e:
            await pl.place("a", PROMPT, 4)
        assert e.value.status_code == 429 and e.value.retry_after_s >= 2.0
        assert pl.stats["rejected"] == 1 and pl.num_waiting == 0
        with pytest.raises(DispatchError) as e:
            await Placer(Reg(W("p0", "prefill")), "t", "disaggregated").place("x", PROMPT, 4)
        assert e.value.status_code == 503
    asyncio.run(go())


def test_reports_feed_the_calibrator():
    pl = placer()
    w = pl.registry.workers["p0"]
    w.report = {"prefill_steps": 0, "prefill_tokens": 0, "prefill_attn_tokens": 0.0,
                "prefill_seconds": 0.0}
    pl.refresh()
    w.report = {"prefill_steps": "2", "prefill_tokens": "1000", "prefill_attn_tokens": 0.0,
                "prefill_seconds": 2.0}
    pl.refresh()
    assert pl.calibrator.model != pl.calibrator.profile
    pl.refresh()  # the same report object is not a new sample
    assert len(pl.calibrator._prefill) == 1


def test_decode_reports_name_peers_by_address_and_calibrate_the_pair():
    pl = Placer(Reg(W("p0", "prefill", request_address="tcp://h:1"),
                    W("d0", "decode", request_address="tcp://h:2")), "t", "disaggregated")
    d0 = pl.registry.workers["d0"]
    d0.report = {"kv_received": []}
    pl.refresh()
    d0.report = {"kv_received": [{"peer": "tcp://h:1", "num_transfers": 2,
                                  "bytes": 4_000_000, "seconds": 0.01}]}
    pl.refresh()
    m = pl.calibrator.model
    assert set(m.pair_bandwidth_bytes_s) == set(m.pair_latency_s) == {"p0->d0"}
    assert m.pair_bandwidth_bytes_s["p0->d0"] != pl.calibrator.profile.bandwidth_bytes_s
    assert d0.report["kv_received"][0]["peer"] == "tcp://h:1"  # the report is not mutated
    text = "\n".join(pl.metrics_lines())
    assert f'pdserve_router_pair_bandwidth_bytes_per_second{{pair="p0->d0"}} ' \
        f'{m.pair_bandwidth_bytes_s["p0->d0"]:.6g}' in text
