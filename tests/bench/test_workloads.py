"""Prompts of exact lengths, Mooncake prefix sharing, seeded Poisson arrivals."""

import math

import numpy as np
import pytest

from pdserve.bench import traces, workloads
from pdserve.bench.traces import TraceRow
from pdserve.bench.workloads import LengthDist, TokenPool

POOL = TokenPool.from_range(49152, first=17)  # SmolLM2's vocabulary without its specials


def test_mooncake_equal_hash_ids_equal_blocks():
    rows = [TraceRow(0.0, 10, 2, (7, 8, 9), block_tokens=4),
            TraceRow(0.1, 12, 2, (7, 8, 5), block_tokens=4),
            TraceRow(0.2, 3, 2, (7,), block_tokens=4),
            TraceRow(0.3, 9, 2, (1, 8, 9), block_tokens=4)]
    a, b, c, d = (s.prompt_token_ids for s in workloads.from_trace(rows, POOL, seed=1))
    assert [len(p) for p in (a, b, c, d)] == [10, 12, 3, 9]
    assert a[:8] == b[:8] and a[8:10] != b[8:10]  # blocks 7, 8 shared; 9 vs 5 differ
    assert c == a[:3]  # a cut block is the block's prefix
    assert d[4:8] == a[4:8] and d[:4] != a[:4]  # a block's tokens depend on its id alone
    assert min(min(p) for p in (a, b, c, d)) >= 17
    again = workloads.from_trace(rows, POOL, seed=1)
    assert [s.prompt_token_ids for s in again] == [a, b, c, d]
    assert workloads.from_trace(rows, POOL, seed=2)[0].prompt_token_ids != a


@pytest.mark.skipif(not traces.TRACES_DIR.is_dir(), reason="no traces dir")
def test_mooncake_real_rows_share_prefix():
    rows = traces.read_trace("mooncake")
    pair = traces.scale_rows([rows[15], rows[58]], length_scale=0.05)  # 5 of 6 ids shared
    assert [r.block_tokens for r in pair] == [26, 26]
    assert [r.num_input_tokens for r in pair] == [138, 138]  # round(137.6), round(137.7)
    p, q = (s.prompt_token_ids for s in workloads.from_trace(pair, POOL))
    assert len(p) == len(q) == 138
    assert p[:130] == q[:130] and p[130:] != q[130:]


def test_mooncake_padding_when_blocks_run_short():
    row = TraceRow(0.0, 7, 1, (3,), block_tokens=4)  # one block cannot cover 7 tokens
    p = workloads.mooncake_prompt(row, POOL, seed=0, request_key=5)
    assert len(p) == 7 and p[:4] == POOL.draw((0, 3, 3), 4)


def test_synthetic_and_shared_prefix_lengths():
    syn = workloads.synthetic(20, LengthDist.parse("uniform:5:9"), LengthDist.parse("3"), POOL)
    assert all(5 <= len(s.prompt_token_ids) <= 9 and s.num_output_tokens == 3 for s in syn)
    mix = workloads.shared_prefix(30, 3, 16, LengthDist.parse("4"), LengthDist.parse("2"), POOL)
    assert all(len(s.prompt_token_ids) == 20 for s in mix)
    by_group = {}
    for s in mix:
        by_group.setdefault(s.group, set()).add(s.prompt_token_ids[:16])
    assert sorted(by_group) == [0, 1, 2] and all(len(v) == 1 for v in by_group.values())
    assert len({s.prompt_token_ids[16:] for s in mix}) == 30  # distinct suffixes


def test_length_dist_parse():
    assert LengthDist.parse("128") == LengthDist("fixed", 128.0)
    assert LengthDist.parse("normal:100:10") == LengthDist("normal", 100.0, 10.0)
    with pytest.raises(ValueError):
        LengthDist.parse("uniform:5")
    rng = np.random.default_rng(0)
    assert min(LengthDist.parse("exp:2").sample(rng, 1000)) >= 1


def test_poisson_arrivals_seeded():
    times = workloads.poisson_arrivals(20000, rate=4.0, seed=11)
    assert times == workloads.poisson_arrivals(20000, rate=4.0, seed=11)
    assert times != workloads.poisson_arrivals(20000, rate=4.0, seed=12)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:], strict=False))
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(0.25, rel=0.02)  # 1 / rate
    assert gaps.std() == pytest.approx(0.25, rel=0.03)  # exponential: std == mean
    assert workloads.poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0]
    specs = workloads.synthetic(3, LengthDist.parse("2"), LengthDist.parse("1"), POOL)
    timed = workloads.with_arrivals(specs, [0.0, 1.0, 3.0])
    assert [s.arrival_s for s in workloads.speed_up(timed, 2.0)] == [0.0, 0.5, 1.5]
