"""Metrics on hand-made timestamps: exact TTFT, TPOT, ITL, throughput and goodput."""

import pytest

from pdserve.bench.metrics_report import RequestResult, stats_ms, summarize


def _req(i, times, n_out, n_in=100, error=None):
    return RequestResult(i, scheduled_s=float(i), sent_s=float(i), num_prompt_tokens=n_in,
                         num_output_tokens=n_out, num_requested_output_tokens=n_out,
                         token_times_s=times, e2e_s=times[-1] + 0.01 if times else None,
                         error=error)


REQUESTS = [
    _req(0, [0.5, 0.6, 0.7, 0.8, 0.9], 5),  # ttft 500, tpot 100
    _req(1, [1.0, 1.3, 1.6], 3),  # ttft 1000, tpot 300
    _req(2, [2.5], 1),  # ttft 2500, no tpot
    _req(3, [], 0, error="http 429: busy"),
]


def test_per_request_metrics():
    r = REQUESTS[0]
    assert r.ttft_s == 0.5
    assert r.tpot_s == pytest.approx(0.1)
    assert r.itls_s == pytest.approx([0.1] * 4)
    assert REQUESTS[2].tpot_s is None and REQUESTS[2].itls_s == []
    assert not REQUESTS[3].ok and REQUESTS[3].ttft_s is None


def test_tpot_counts_tokens_not_chunks():
    r = _req(0, [0.2, 0.5], 4)  # 4 tokens in 2 chunks: (0.5 - 0.2) / 3
    assert r.tpot_s == pytest.approx(0.1)


def test_summary_exact():
    s = summarize(REQUESTS, duration_s=4.0, slo_ttft_ms=1200, slo_tpot_ms=200)
    assert (s["num_requests"], s["num_ok"], s["num_errors"]) == (4, 3, 1)
    assert s["errors"] == {"http 429": 1}
    assert s["request_throughput"] == 0.75
    assert s["output_token_throughput"] == 2.25  # 9 tokens / 4 s
    assert s["total_token_throughput"] == 77.25  # (300 + 9) / 4
    assert s["ttft_ms"]["mean"] == pytest.approx(4000 / 3, abs=1e-3)
    assert s["ttft_ms"]["p50"] == 1000.0
    assert s["ttft_ms"]["p90"] == pytest.approx(2200.0)  # 1000 + 0.8 * 1500
    assert s["tpot_ms"]["p50"] == pytest.approx(200.0)  # (100 + 300) / 2
    assert s["itl_ms"]["max"] == pytest.approx(300.0)
    assert s["itl_ms"]["p50"] == pytest.approx(100.0)  # 100 x4, 300 x2
    # only request 0 meets both (1 fails TPOT, 2 fails TTFT, 3 failed)
    assert s["goodput"] == 0.25 and s["slo_attainment"] == 0.25
    loose = summarize(REQUESTS, 4.0, slo_ttft_ms=3000, slo_tpot_ms=None)
    assert loose["goodput"] == 0.75 and loose["slo_attainment"] == 0.75  # a 1-token answer passes


def test_stats_ms_empty():
    assert stats_ms([]) is None
    assert stats_ms([0.001, 0.003]) == {"mean": 2.0, "p50": 2.0, "p90": 2.8, "p99": 2.98,
                                        "max": 3.0}
