"""``Linear``: ``nn.Linear`` with faster calls for decode-sized inputs.

Same parameters, same layout (``weight`` ``[out, in]`` row-major, one copy), so
``load_weights`` and weight tying are unchanged. On CUDA, bf16/fp16 input of 1..8
rows (decode steps) runs the Triton GEMV (``kernels.ops.linear_small_m``), a pure
weight stream meant to beat cuBLAS's small-M GEMMs (~0.9x the copy rate on the H200;
``bench/gemv_h200.py`` measures both); every other CUDA input, float32 included (the
exact-match tests against transformers run fp32), keeps ``F.linear`` and cuBLAS's
numerics. On the CPU, for ``x`` of ``M`` rows,
``F.linear`` computes ``x @ W^T``; MKL runs that shape as a skinny GEMM that is
slow for small ``M`` (SmolLM2-135M's layer GEMMs plus lm_head, 2 AVX2 cores, cold
weights: about 63 ms per decode step at M=8), while the transposed problem
``W @ x^T`` (``[out, in] @ [in, M]``, output ``[out, M]``) takes about 43 ms. At
M=1 both run as a single-threaded GEMV (about 37 ms); one zero row added to make
M=2 takes the GEMM path on both cores (about 29 ms), so a lone row is padded so.
Each output element is still the dot product of one weight row with one input
row, summed in float32. From a few hundred rows on (prefill chunks) ``F.linear``
is as fast or faster (no transposed output to copy back), so ``Linear`` keeps it
above ``WXT_MAX_ROWS``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.kernels import ops

WXT_MAX_ROWS = 128  # measured: faster up to 128 rows, slower from 256 (2-core AVX2)


def linear_wxt(x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x`` ``[M, in]``, computed as
    ``(weight @ x^T + bias)^T``; returns a new contiguous ``[M, out]``. A lone row
    is computed beside a zero row (see the module doc). Pure."""
    m = x.shape[0]
    if m == 1:
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])
    if bias is None:
        out = torch.mm(weight, x.t())  # [out, M]
    else:
        out = torch.addmm(bias[:, None], weight, x.t())
    return out[:, :m].t().contiguous()


class Linear(nn.Linear):
    """``nn.Linear``; on CUDA, ``ops.linear_small_m`` where ``ops.can_gemv`` (bf16/fp16,
    1..8 rows); on the CPU with 2-D input of at most ``WXT_MAX_ROWS`` rows its forward
    is ``linear_wxt``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and ops.can_gemv(x, self.weight):
            return ops.linear_small_m(x, self.weight, self.bias)
        if x.is_cuda or x.dim() != 2 or x.shape[0] > WXT_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        return linear_wxt(x, self.weight, self.bias)
