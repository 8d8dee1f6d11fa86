"""Cost formulas, the profile file, and the online least-squares fit."""

from pathlib import Path

import pytest

from pdserve.router.cost_model import Calibrator, CostModel, load_profile

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_formulas_exact():
    c = CostModel(prefill_step_s=0.5, prefill_token_s=0.25, prefill_attn_s=0.125,
                  decode_step_s=1.0, decode_seq_s=0.5, decode_ctx_s=0.25,
                  kv_bytes_per_token=4, block_size=2, transfer_latency_s=1.0,
                  bandwidth_bytes_s=8.0, pair_bandwidth_bytes_s={"p->d": 16.0},
                  prefill_chunk_tokens=4)
    # 6 new after 2 cached: 2 chunks * 0.5 + 6 * 0.25 + 6 * (2 + 3) * 0.125
    assert c.prefill_s(6, 2) == 1.0 + 1.5 + 3.75
    assert c.prefill_s(0, 5) == 0.0
    assert c.decode_step(2, 4) == 1.0 + 1.0 + 1.0
    assert c.decode_step(0, 10) == 0.0
    assert c.transfer_s(3, "x", "d") == 1.0 + 3 * 2 * 4 / 8.0
    assert c.transfer_s(3, "p", "d") == 1.0 + 3 * 2 * 4 / 16.0
    assert c.transfer_s(0, "p", "d") == 0.0


def test_profiles_load_and_bad_keys_are_named(tmp_path):
    for name in ("profile-cpu.yaml", "profile-h200-llama3-8b.yaml"):
        c = load_profile(CONFIGS / name)
        assert c.prefill_token_s > 0 and c.decode_step_s > 0 and c.kv_bytes_per_token > 0
    bad = tmp_path / "p.yaml"
    bad.write_text("prefill_token_s: 1\nwarp_factor: 9\n")
    with pytest.raises(ValueError, match=r"p.yaml: unknown key 'warp_factor'"):
        load_profile(bad)
    bad.write_text("decode_step_s: -1\n")
    with pytest.raises(ValueError, match=r"key 'decode_step_s' must be a non-negative"):
        load_profile(bad)


def _reports(true: CostModel, batches):
    """Cumulative counters of a worker whose steps cost exactly what ``true`` says."""
    acc = dict(prefill_steps=0, prefill_tokens=0, prefill_attn_tokens=0, prefill_seconds=0.0,
               decode_steps=0, decode_seqs=0, decode_ctx_tokens=0, decode_seconds=0.0)
    out = [dict(acc)]
    for steps, tokens, attn, dsteps, seqs, ctx in batches:
        acc["prefill_steps"] += steps
        acc["prefill_tokens"] += tokens
        acc["prefill_attn_tokens"] += attn
        acc["prefill_seconds"] += (steps * true.prefill_step_s + tokens * true.prefill_token_s
                                   + attn * true.prefill_attn_s)
        acc["decode_steps"] += dsteps
        acc["decode_seqs"] += seqs
        acc["decode_ctx_tokens"] += ctx
        acc["decode_seconds"] += (dsteps * true.decode_step_s + seqs * true.decode_seq_s
                                  + ctx * true.decode_ctx_s)
        out.append(dict(acc))
    return out


def test_calibration_recovers_the_true_coefficients():
    profile = CostModel(prefill_step_s=0.01, prefill_token_s=1e-3, prefill_attn_s=1e-7,
                        decode_step_s=0.05, decode_seq_s=1e-3, decode_ctx_s=1e-6)
    true = CostModel(prefill_step_s=0.002, prefill_token_s=2e-4, prefill_attn_s=3e-8,
                     decode_step_s=0.01, decode_seq_s=5e-4, decode_ctx_s=2e-7)
    cal = Calibrator(profile, strength=1e-12)
    assert cal.model == profile  # no samples yet: the profile
    batches = [(1, 100, 5_000, 10, 20, 2_000), (3, 900, 200_000, 7, 70, 30_000),
               (2, 300, 40_000, 20, 20, 1_000), (5, 2_000, 900_000, 5, 40, 80_000),
               (1, 10, 50, 12, 96, 9_000)]
    for r in _reports(true, batches):
        cal.observe("w0", r)
    m = cal.model
    for k in ("prefill_step_s", "prefill_token_s", "prefill_attn_s", "decode_step_s",
              "decode_seq_s", "decode_ctx_s"):
        assert getattr(m, k) == pytest.approx(getattr(true, k), rel=1e-6), k


def _kv(*rows):
    """A decode worker's report: cumulative (peer, transfers, bytes, seconds) rows."""
    return {"kv_received": [{"peer": p, "num_transfers": n, "bytes": b, "seconds": s}
                            for p, n, b, s in rows]}


def test_transfers_use_the_profile_until_a_pair_reports():
    profile = CostModel(kv_bytes_per_token=1000, block_size=10, transfer_latency_s=0.005,
                        bandwidth_bytes_s=5e8)
    cal = Calibrator(profile)
    cal.observe("d0", _kv())
    cal.observe("d0", _kv(("p0", 3, 0, 0.0)))  # not measured (one-sided): no sample
    cal.observe("d0", _kv(("p0", 3, 0, 0.0)))
    assert cal.model == profile
    assert cal.model.transfer_s(4, "p0", "d0") == 0.005 + 4 * 10 * 1000 / 5e8


def test_pair_latency_and_bandwidth_are_fitted_from_decode_reports():
    profile = CostModel(kv_bytes_per_token=1000, block_size=10, transfer_latency_s=0.005,
                        bandwidth_bytes_s=5e8)
    cal = Calibrator(profile, strength=1e-12)
    truth = {"p0": (0.002, 2e9), "p1": (0.001, 1e9)}  # latency s, bytes/s

    def row(peer, n, nbytes):
        lat, bw = truth[peer]
        return peer, n, nbytes, n * lat + nbytes / bw

    cal.observe("d0", _kv())
    totals = {"p0": [0, 0], "p1": [0, 0]}
    for peer, n, nbytes in (("p0", 1, 1_000_000), ("p0", 2, 8_000_000), ("p0", 1, 3_000_000),
                            ("p1", 1, 2_000_000), ("p1", 3, 2_000_000)):
        totals[peer][0] += n
        totals[peer][1] += nbytes
        cal.observe("d0", _kv(*(row(p, *t) for p, t in totals.items() if t[0])))
    m = cal.model
    for peer, (lat, bw) in truth.items():
        assert m.pair_latency_s[f"{peer}->d0"] == pytest.approx(lat, rel=1e-9)
        assert m.pair_bandwidth_bytes_s[f"{peer}->d0"] == pytest.approx(bw, rel=1e-9)
        assert m.transfer_s(5, peer, "d0") == pytest.approx(lat + 50_000 / bw, rel=1e-9)
    assert set(m.pair_bandwidth_bytes_s) == {"p0->d0", "p1->d0"}
    # a pair that never reported: the pooled fit of every pair's samples, not the profile
    assert m.latency("p0", "d1") == m.transfer_latency_s != profile.transfer_latency_s
    assert 1e9 < m.bandwidth("p0", "d1") == m.bandwidth_bytes_s < 2e9


def test_one_transfer_sample_moves_the_pair_part_way_from_the_profile():
    # x = [transfers, bytes] = [1, 2], y = 5 s; prior [latency 1, 1/bandwidth 1]; the
    # penalty scales are mean(x^2) = [1, 4]:  [[2, 2], [2, 8]] w = [5 + 1, 10 + 4]
    profile = CostModel(transfer_latency_s=1.0, bandwidth_bytes_s=1.0, kv_bytes_per_token=1,
                        block_size=2)
    cal = Calibrator(profile, strength=1.0)
    cal.observe("d0", _kv(("p0", 4, 10, 7.0)))
    cal.observe("d0", _kv(("p0", 5, 12, 12.0)))
    m = cal.model
    assert m.pair_latency_s["p0->d0"] == pytest.approx(5 / 3, rel=1e-12)
    assert m.pair_bandwidth_bytes_s["p0->d0"] == pytest.approx(3 / 4, rel=1e-12)
    assert m.transfer_s(3, "p0", "d0") == pytest.approx(5 / 3 + 3 * 2 / 0.75, rel=1e-12)
    assert m.transfer_s(3, "p1", "d0") == m.transfer_s(3, "p0", "d0")  # the pooled default
    cal.observe("d0", _kv(("p0", 5, 12, 12.0)))  # nothing new: no sample, same fit
    assert cal.model == m
    cal.observe("d0", _kv(("p0", 1, 4, 1.0)))  # the worker restarted: a new baseline
    assert cal.model == m
