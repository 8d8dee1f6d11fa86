"""kernels.l2_prefetch: the host-side plan (exact sizes) and where it stays off."""

import pytest
import torch

pytest.importorskip("triton")

from pdserve.kernels import l2_prefetch as l2  # noqa: E402


@pytest.fixture
def as_if_sm90(monkeypatch):
    monkeypatch.setattr(l2, "use_pdl", lambda t: True)


def test_plan_rounds_each_lane_down_to_16_bytes(as_if_sm90):
    w = torch.empty(1000, 512, dtype=torch.bfloat16)  # 1,024,000 bytes
    p = l2.plan(w, 100_000, lanes=128, programs=4)
    assert (p.programs, p.lanes, p.chunk) == (4, 128, 192)  # 100000 / 512 = 195.3 -> 192
    assert p.nbytes == 98_304 and p.target is w


def test_plan_is_capped_at_the_target_size(as_if_sm90):
    w = torch.empty(64, 64, dtype=torch.float32)  # 16,384 bytes
    p = l2.plan(w, 1 << 30, lanes=32, programs=8)
    assert p.chunk == 64 and p.nbytes == 16_384


@pytest.mark.parametrize("nbytes", [0, -5, 100])  # 100 bytes < one 16-byte chunk per lane
def test_plan_is_none_without_budget(as_if_sm90, nbytes):
    assert l2.plan(torch.empty(4096, dtype=torch.bfloat16), nbytes, lanes=32) is None


def test_plan_is_none_for_a_missing_or_strided_target(as_if_sm90):
    assert l2.plan(None, 1 << 20, lanes=32) is None
    assert l2.plan(torch.empty(64, 64).t(), 1 << 12, lanes=32) is None


def test_plan_is_off_on_the_cpu():
    assert l2.plan(torch.empty(1 << 20, dtype=torch.bfloat16), 1 << 20, lanes=32) is None
    like = torch.empty(2)
    assert l2.launch_args(None, like) == (like, 0, 0, False)
