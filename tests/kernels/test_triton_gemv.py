"""Triton GEMV (``triton_gemv.gemv``) against ``reference.linear``.

CPU: Triton's interpreter at small sizes (conftest sets it up), every variant forced
by an explicit config; N and K are not multiples of the blocks; fp16 (the
interpreter's bf16 dot returns garbage). GPU: real Llama-3-8B shapes in bf16 and
fp16, autotuning, and a CUDA-graph capture.
"""

import pytest
import torch

from pdserve.kernels import reference

triton = pytest.importorskip("triton")
from kernel_checks import gpu, interpreter  # noqa: E402

from pdserve.kernels.triton_fused import silu_and_mul  # noqa: E402
from pdserve.kernels.triton_gemv import (  # noqa: E402
    SM90_PICKS,
    GemvConfig,
    chosen_configs,
    gemv,
    gemv_glu,
    preset_config,
)

DOT = GemvConfig(16, 64, 4, 2)
SPLIT = GemvConfig(16, 32, 4, 2, 3)  # K=200 -> 3 splits of 2, 2 and 3 tiles' worth


def check(m, n, k, dtype, bias, device, config=None):
    """Fresh random operands, NaN-poisoned output; the result equals the float64
    reference rounded to ``dtype`` within one unit in the last place, plus what
    summing K products in float32 in another order may move it (2^-20 of the sum of
    the products' magnitudes: ~0.009 at K=14336, where a near-zero output's rounding
    differs by up to 0.0024 between any two fp32 orders; ~1e-4 at K=200)."""
    x = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    got = gemv(x, w, b, out=out, config=config)
    assert got is out
    ref = reference.linear(x.double(), w.double(), None if b is None else b.double())
    eps = torch.finfo(dtype).eps
    order = 2.0 ** -20 * (x.double().abs() @ w.double().abs().t())
    diff = (got.double() - ref.to(dtype).double()).abs()
    bound = eps * ref.abs() + eps + order
    assert not got.isnan().any()
    assert (diff <= bound).all(), f"max excess {(diff - bound).max().item():.3g}"


@interpreter
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("config", [DOT, SPLIT], ids=["dot", "split_k"])
def test_gemv_interpreter_fp16(config, m, bias):
    check(m, 37, 200, torch.float16, bias, "cpu", config)


@interpreter
def test_gemv_interpreter_strided():
    """A weight that is a row slice of a wider matrix, x a column slice: strides honored,
    out allocated."""
    w_full = torch.randn(40, 160, dtype=torch.float16)
    w = w_full[:, :144]  # [40, 144], row stride 160
    x = torch.randn(2, 300, dtype=torch.float16)[:, 100:244]
    got = gemv(x, w, config=GemvConfig(16, 32, 4, 1))
    ref = reference.linear(x.float(), w.float()).to(torch.float16)
    eps = torch.finfo(torch.float16).eps
    torch.testing.assert_close(got, ref, rtol=eps, atol=eps)


@interpreter
def test_gemv_interpreter_split_k_tickets_reset():
    """Split-K twice on one shape: the per-tile tickets are left zero by every launch,
    so the second launch merges again (a stale ticket would skip or double a merge)."""
    from pdserve.kernels.triton_gemv import _workspaces

    check(2, 37, 200, torch.float16, False, "cpu", SPLIT)
    assert not _workspaces[torch.device("cpu")][1].any()
    check(2, 37, 200, torch.float16, True, "cpu", SPLIT)
    assert not _workspaces[torch.device("cpu")][1].any()


def check_glu(m, half_n, k, dtype, device, config=None):
    """``gemv_glu`` against ``silu_and_mul(gemv(...))`` with the same config, output
    NaN-poisoned: the same bits on the GPU; within one unit in the last place under the
    interpreter, whose numpy ``exp`` may round a vector's elements differently by where
    they sit (it does at M = 8)."""
    x = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(2 * half_n, k, dtype=dtype, device=device)
    ref = silu_and_mul(gemv(x, w, config=config))
    out = torch.full((m, half_n), float("nan"), dtype=dtype, device=device)
    got = gemv_glu(x, w, out=out, config=config)
    assert got is out and not got.isnan().any()
    if device == "cpu":
        eps = torch.finfo(dtype).eps
        tiny = torch.finfo(dtype).tiny * eps  # the smallest subnormal step
        up = gemv(x, w, config=config)[:, half_n:].float()
        silu = ((ref.float() / up).nan_to_num(0.0)).abs()
        # one unit in the last place of silu(gate), a subnormal step where it is that
        # small, moves the product by |up| times that step
        step = torch.clamp(eps * silu, min=tiny)
        diff = (got.float() - ref.float()).abs()
        bound = eps * ref.float().abs() + up.abs() * step + 2 * tiny
        assert (diff <= bound).all(), (diff - bound).max().item()
        assert (diff == 0).float().mean() > 0.95  # almost all are the same bits
    else:
        assert torch.equal(got, ref)


@interpreter
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("config", [DOT, GemvConfig(32, 64, 4, 2), SPLIT],
                         ids=["dot", "dot32", "split_k"])
def test_gemv_glu_interpreter_fp16(config, m):
    """Columns not a multiple of the half tile (37): the last program's clamped rows."""
    check_glu(m, 37, 200, torch.float16, "cpu", config)


def test_prefetch_bytes_stay_in_each_split_and_aligned(monkeypatch):
    """The budget, cut to the smallest split's share of a row; none where a row or a
    split would start off a 16-byte boundary."""
    import pdserve.kernels.triton_gemv as tg

    monkeypatch.setattr(tg, "PREFETCH_ROW_BYTES", 512)
    w = torch.empty(64, 4096, dtype=torch.bfloat16)
    assert tg._prefetch_bytes(w, GemvConfig(64, 128, 4, 4)) == 512
    assert tg._prefetch_bytes(w, GemvConfig(16, 128, 4, 6, 8)) == 512  # 1024 B a split
    # K = 200 in 3 splits of 96 (3 tiles of 32), 96 and 8 elements: 16 bytes
    assert tg._prefetch_bytes(torch.empty(8, 200, dtype=torch.float16), SPLIT) == 16
    assert tg._prefetch_bytes(torch.empty(8, 100, dtype=torch.float16), DOT) == 0  # 200 B rows
    assert tg._prefetch_bytes(w[:, 1:], GemvConfig(64, 128, 4, 4)) == 0  # 2-byte offset
    monkeypatch.setattr(tg, "PREFETCH_ROW_BYTES", 100)
    assert tg._prefetch_bytes(w, GemvConfig(64, 128, 4, 4)) == 96


def rows_alone_equal_rows_together(n, k, dtype, device, config=None):
    """Each of 8 rows computed alone, and the first m rows together for every m, give
    the same bits as all 8 together (batch invariance)."""
    x = torch.randn(8, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device)
    together = gemv(x, w, config=config)
    for m in range(1, 9):
        assert torch.equal(gemv(x[:m], w, config=config), together[:m]), m
    for i in range(8):
        assert torch.equal(gemv(x[i:i + 1], w, config=config), together[i:i + 1]), i


@interpreter
@pytest.mark.parametrize("config", [DOT, SPLIT], ids=["dot", "split_k"])
def test_gemv_interpreter_batch_invariant(config):
    rows_alone_equal_rows_together(37, 200, torch.float16, "cpu", config)


LLAMA3_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("n,k", LLAMA3_8B[:4] + [(1000, 4000)])
def test_gemv_gpu_autotuned(n, k, m, dtype):
    check(m, n, k, dtype, bias=(m == 3), device="cuda")
    assert (n, k, dtype, torch.cuda.current_device()) in chosen_configs()


def test_preset_only_for_sm90_half_precision():
    assert preset_config(6144, 4096, torch.bfloat16, (9, 0)) == GemvConfig(64, 128, 4, 6)
    assert preset_config(4096, 14336, torch.float16, (9, 0)) == GemvConfig(64, 128, 4, 6, 2)
    assert preset_config(6144, 4096, torch.bfloat16, (8, 0)) is None  # A100: autotune
    assert preset_config(6144, 4096, torch.float32, (9, 0)) is None
    assert preset_config(1000, 4000, torch.bfloat16, (9, 0)) is None  # not a preset shape
    assert all(k >= c.split_k * c.block_k for (_, k), c in SM90_PICKS.items())


@gpu
@pytest.mark.gpu
def test_gemv_gpu_uses_the_preset_on_sm90():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("presets are for sm_90")
    n, k = 4096, 14336
    check(2, n, k, torch.bfloat16, False, "cuda")
    assert chosen_configs()[(n, k, torch.bfloat16, torch.cuda.current_device())] == \
        SM90_PICKS[(n, k)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("config", [DOT, GemvConfig(64, 128, 4, 4),
                                    GemvConfig(32, 128, 4, 6, 4),
                                    GemvConfig(16, 128, 4, 6, 8)],
                         ids=["dot", "dot64", "split4", "split8"])
@pytest.mark.parametrize("m", [1, 4, 8])
def test_gemv_gpu_variants(config, m):
    check(m, 1000, 4000, torch.bfloat16, True, "cuda", config)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 8])
@pytest.mark.parametrize("config", [None, GemvConfig(32, 128, 4, 6, 4)], ids=["pick", "split4"])
def test_gemv_glu_gpu_same_bits(config, m):
    """Llama-3-8B's gate/up (FFN 14336) in bf16, the sm_90 pick or autotuned, and a
    split-K config: the same bits as the GEMV followed by SiLU * up."""
    check_glu(m, 14336, 4096, torch.bfloat16, "cuda", config)


@gpu
@pytest.mark.gpu
def test_gemv_glu_gpu_autotunes_on_the_plain_kernel():
    """A shape with no preset and no pick yet: the plain kernel is autotuned once for
    the weight's shape (its output thrown away) and the GLU launch uses that pick."""
    n, k = 2 * 1000, 4000
    assert (n, k, torch.bfloat16, torch.cuda.current_device()) not in chosen_configs()
    x = torch.randn(2, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    got = gemv_glu(x, w)
    pick = chosen_configs()[(n, k, torch.bfloat16, torch.cuda.current_device())]
    assert torch.equal(got, silu_and_mul(gemv(x, w, config=pick)))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", LLAMA3_8B[:4])
def test_gemv_gpu_l2_prefetch_same_bits(n, k, monkeypatch):
    """The L2 prefetch before the PDL wait is a hint: the same bits with and without
    (GEMV and the fused GLU, the sm_90 picks, split-K for down_proj)."""
    import pdserve.kernels.triton_gemv as tg

    x = torch.randn(2, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    default = gemv(x, w), gemv_glu(x, w)
    for budget in (0, 2048):
        monkeypatch.setattr(tg, "PREFETCH_ROW_BYTES", budget)
        assert tg._prefetch_bytes(w, tg.GemvConfig(64, 128, 4, 4, 2)) == budget
        assert torch.equal(gemv(x, w), default[0]) and torch.equal(gemv_glu(x, w), default[1])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", LLAMA3_8B[:4])
def test_gemv_gpu_batch_invariant(n, k):
    """The autotuned pick: a row's output does not depend on the other rows."""
    rows_alone_equal_rows_together(n, k, torch.bfloat16, "cuda")


@gpu
@pytest.mark.gpu
def test_gemv_gpu_graph_capture():
    """Eager first (autotunes), then captured and replayed with new x: no host sync, the
    remembered config; a shape never run eagerly captures with the default config."""
    n, k = 6144, 4096
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4, k, dtype=torch.bfloat16, device="cuda")
    w2 = torch.randn(1000, 2048, dtype=torch.bfloat16, device="cuda")
    x2 = torch.randn(1, 2048, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(4, n, dtype=torch.bfloat16, device="cuda")
    out2 = torch.empty(1, 1000, dtype=torch.bfloat16, device="cuda")
    gemv(x, w, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv(x, w, out=out)
        gemv(x2, w2, out=out2)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        x2.copy_(torch.randn_like(x2))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for o, a, b in ((out, x, w), (out2, x2, w2)):
            ref = reference.linear(a.float(), b.float())
            assert ((o.float() - ref).norm() / ref.norm()).item() < 1e-2
