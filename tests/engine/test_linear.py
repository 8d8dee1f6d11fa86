"""engine.linear: the CPU forward computes F.linear's values (integer-valued inputs, so
every sum is exact in float32 and the comparison is exact)."""

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.linear import Linear, linear_wxt


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_wxt_equals_f_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randint(-8, 8, (rows, 24), generator=gen).float()
    w = torch.randint(-8, 8, (40, 24), generator=gen).float()
    b = torch.randint(-8, 8, (40,), generator=gen).float() if bias else None
    out = linear_wxt(x, w, b)
    assert out.shape == (rows, 40) and out.is_contiguous()
    assert torch.equal(out, F.linear(x, w, b))


def test_one_row_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.5, 0.0]])
    x = torch.tensor([[10.0, 1.0]])
    assert linear_wxt(x, w, torch.tensor([0.0, 1.0, -1.0])).tolist() == [[12.0, 27.0, 4.0]]


def test_module_keeps_nn_linear_parameters():
    lin = Linear(3, 2, bias=True)
    assert isinstance(lin, torch.nn.Linear)
    assert lin.weight.shape == (2, 3) and lin.weight.is_contiguous()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
        lin.bias.copy_(torch.tensor([0.5, 0.0]))
        assert lin(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[7.5, 1.0]]
        assert lin(torch.ones(2, 4, 3)).shape == (2, 4, 2)  # not 2-D: F.linear


def test_module_uses_f_linear_above_wxt_max_rows(monkeypatch):
    from pdserve.engine import linear

    calls = []
    monkeypatch.setattr(linear, "linear_wxt", lambda *a: calls.append(a[0].shape[0]) or a[0])
    lin = Linear(3, 3, bias=False)
    with torch.no_grad():
        lin(torch.ones(linear.WXT_MAX_ROWS, 3))
        lin(torch.ones(linear.WXT_MAX_ROWS + 1, 3))
    assert calls == [linear.WXT_MAX_ROWS]
