"""engine.linear: the CPU forwards compute F.linear's values (integer-valued inputs, so
every sum is exact in float32 and the comparison is exact)."""

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine import linear
from pdserve.engine.linear import Linear, linear_packed, linear_wxt, pack_weight


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
    monkeypatch.setattr(linear, "can_pack", lambda w: False)  # a torch without oneDNN
    calls = []
    monkeypatch.setattr(linear, "linear_wxt", lambda *a: calls.append(a[0].shape[0]) or a[0])
    lin = Linear(3, 3, bias=False)
    with torch.no_grad():
        lin(torch.ones(linear.WXT_MAX_ROWS, 3))
        lin(torch.ones(linear.WXT_MAX_ROWS + 1, 3))
    assert calls == [linear.WXT_MAX_ROWS]


needs_onednn = pytest.mark.skipif(not linear.can_pack(torch.ones(1, 1)),
                                  reason="this torch has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 24), (8, 24), (300, 24), (2, 3, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_packed_equals_f_linear(shape, bias):
    gen = torch.Generator().manual_seed(shape[0])
    x = torch.randint(-8, 8, shape, generator=gen).float()
    w = torch.randint(-8, 8, (40, 24), generator=gen).float()
    b = torch.randint(-8, 8, (40,), generator=gen).float() if bias else None
    out = linear_packed(x, pack_weight(w), b)
    assert out.shape == (*shape[:-1], 40)
    assert torch.equal(out, F.linear(x, w, b))


@needs_onednn
def test_module_repacks_after_the_weight_changes():
    lin = Linear(2, 3, bias=False)
    x = torch.tensor([[10.0, 1.0]])
    with torch.inference_mode():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.5, 0.0]]))
        assert lin(x).tolist() == [[12.0, 26.0, 5.0]]
        first = lin._packed
        assert lin(x).tolist() == [[12.0, 26.0, 5.0]] and lin._packed is first  # reused
        lin.weight.mul_(2)  # in place: the version counter moves
        assert lin(x).tolist() == [[24.0, 52.0, 10.0]] and lin._packed is not first
    lin.weight = torch.nn.Parameter(torch.ones(3, 2))  # a new tensor
    with torch.inference_mode():
        assert lin(x).tolist() == [[11.0, 11.0, 11.0]]


@needs_onednn
def test_module_falls_back_when_packing_fails_or_grad_is_wanted(monkeypatch):
    lin = Linear(2, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.5, 0.0]]))
    x = torch.tensor([[10.0, 1.0]])
    out = lin(x)  # grad enabled and the weight requires it: the differentiable form
    assert out.requires_grad and lin._packed is None
    assert out.tolist() == [[12.0, 26.0, 5.0]]

    def refuse(weight, rows_hint=8):
        raise RuntimeError("no oneDNN linear here")

    monkeypatch.setattr(linear, "pack_weight", refuse)
    with torch.no_grad():
        assert lin(x).tolist() == [[12.0, 26.0, 5.0]]
    assert lin._pack_failed and lin._packed is None
