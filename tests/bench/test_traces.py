"""Trace parsing on the real files in /work/shared/traces: first rows, exact values."""

import pytest

from pdserve.bench import traces

pytestmark = pytest.mark.skipif(not traces.TRACES_DIR.is_dir(), reason="no traces dir")


def test_azure_code_first_rows():
    rows = traces.read_trace("azure-code")
    assert len(rows) == 8819
    assert rows[0] == traces.TraceRow(0.0, 4808, 10)
    assert rows[1].num_input_tokens == 3180 and rows[1].num_output_tokens == 8
    assert rows[1].timestamp_s == pytest.approx(0.052, abs=1e-6)  # 04.03196 - 03.97996
    assert rows[1].hash_ids is None


def test_azure_conv_first_rows():
    rows = traces.read_trace("azure-conv")
    assert len(rows) == 19366
    assert (rows[0].timestamp_s, rows[0].num_input_tokens, rows[0].num_output_tokens) == (
        0.0, 374, 44)
    assert (rows[1].num_input_tokens, rows[1].num_output_tokens) == (396, 109)
    assert rows[1].timestamp_s == pytest.approx(50.9951690 - 46.6805900, abs=1e-6)
    assert all(b.timestamp_s >= a.timestamp_s for a, b in zip(rows, rows[1:], strict=False))


def test_mooncake_first_rows():
    rows = traces.read_trace("mooncake")
    assert len(rows) == 3993
    assert rows[0] == traces.TraceRow(0.0, 40160, 6, tuple(range(79)))
    assert rows[1].num_input_tokens == 36640 and rows[1].num_output_tokens == 4
    assert rows[1].hash_ids[:3] == (79, 80, 81)
    assert rows[2].timestamp_s == pytest.approx(0.040)  # 40 ms
    assert rows[3].timestamp_s == pytest.approx(0.277)
    assert rows[-1].timestamp_s == pytest.approx(1022.025)
    assert all(len(r.hash_ids) == -(-r.num_input_tokens // 512) for r in rows)


def test_select_and_scale():
    rows = traces.read_trace("azure-conv")
    window = traces.select_rows(rows, 3, "first", skip=1)
    assert [r.num_input_tokens for r in window] == [396, rows[2].num_input_tokens,
                                                    rows[3].num_input_tokens]
    assert window[0].timestamp_s == 0.0  # re-based
    assert window[1].timestamp_s == pytest.approx(rows[2].timestamp_s - rows[1].timestamp_s)
    sample = traces.select_rows(rows, 50, "random", seed=3)
    assert sample == traces.select_rows(rows, 50, "random", seed=3)
    assert sample != traces.select_rows(rows, 50, "random", seed=4)
    assert all(b.timestamp_s >= a.timestamp_s for a, b in zip(sample, sample[1:], strict=False))
    scaled = traces.scale_rows(window[:1], length_scale=0.2, max_input=50, max_output=5)
    assert (scaled[0].num_input_tokens, scaled[0].num_output_tokens) == (50, 5)  # 79 -> 50, 22 -> 5
    assert traces.scale_rows(window[:1], 0.1)[0].num_output_tokens == 11  # round(10.9)


def test_scale_mooncake_keeps_blocks():
    row = traces.read_trace("mooncake")[0]  # 40160 tokens, 79 blocks
    scaled = traces.scale_rows([row], length_scale=0.01)[0]
    assert scaled.block_tokens == 5  # round(5.12)
    assert scaled.num_input_tokens == 395  # min(round(401.6), 79 * 5)
    assert traces.num_blocks(scaled) == 79
    assert scaled.num_output_tokens == 1
