"""What the kernel tests share: where they may run, tolerances, and the error measure."""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (no GPU)")
gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; any NaN or inf gives inf."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm()).item()


# Hand-checked reference tests (test_reference_*.py): a tiny paged cache whose every
# result is exact in float32.
TOY_NB, TOY_BS, TOY_HKV, TOY_D = 6, 2, 2, 4  # blocks of 2 tokens, 2 KV heads
TOY_HQ = 4  # two query heads per KV head


def toy_caches():
    """Zero keys (uniform attention) and values of 1000 everywhere: a slot the test
    does not write is beyond every context and must not be read."""
    k = torch.zeros(TOY_NB, TOY_BS, TOY_HKV, TOY_D)
    v = torch.full((TOY_NB, TOY_BS, TOY_HKV, TOY_D), 1000.0)
    return k, v
