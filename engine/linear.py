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

Faster still, where torch has oneDNN (x86 and arm64 builds): a float32 CPU weight
is reordered once into oneDNN's blocked layout (``pack_weight``) and every call,
any number of rows, runs oneDNN's linear on that copy (``linear_packed``): the same
step's GEMMs take about 33 ms at M=8 and 22 ms at M=1 against 45 and 27 for
``linear_wxt`` (``bench/gemm_floor.py`` measures all the forms in one run), and
prefill-sized inputs tie with ``F.linear``. The packed copy costs a second copy of
each weight in memory; it is rebuilt when the weight changes (a new tensor, or an
in-place write that bumps its version counter, as ``load_weights`` does; a weight
made under ``torch.inference_mode`` has no counter and is matched by storage only). Without
oneDNN, or for other dtypes, the forms above stay.
"""

from dataclasses import dataclass

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


@dataclass(frozen=True)
class PackedWeight:
    """A oneDNN-blocked copy of one weight, tagged with the storage and version of
    the weight it was made from (so that a stale copy is recognised)."""

    data_ptr: int
    version: int | None  # None for an inference tensor (it keeps no version counter)
    packed: torch.Tensor  # opaque ``torch._mkldnn`` layout

    def matches(self, weight: torch.Tensor) -> bool:
        return self.data_ptr == weight.data_ptr() and self.version == _version(weight)


def _version(weight: torch.Tensor) -> int | None:
    return None if weight.is_inference() else weight._version


# this torch has oneDNN's linear ops (looked up once: ``can_pack`` runs on every call)
_ONEDNN = (torch.backends.mkldnn.is_available()
           and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def can_pack(weight: torch.Tensor) -> bool:
    """True where ``pack_weight`` works: a float32 CPU weight and a torch with
    oneDNN's linear ops. Pure."""
    return _ONEDNN and weight.device.type == "cpu" and weight.dtype == torch.float32


def pack_weight(weight: torch.Tensor, rows_hint: int = 8) -> PackedWeight:
    """Reorder ``weight`` ``[out, in]`` into oneDNN's layout (``rows_hint``: the row
    count the layout is tuned for; any count works). Pure: returns a new copy."""
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
    return PackedWeight(weight.data_ptr(), _version(weight), packed)


def linear_packed(x: torch.Tensor, packed: PackedWeight,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for float32 CPU ``x`` ``[..., in]`` through the
    packed weight; returns a new ``[..., out]``. Pure."""
    return torch.ops.mkldnn._linear_pointwise(x, packed.packed, bias, "none", [], "")


class Linear(nn.Linear):
    """``nn.Linear``; on CUDA, ``ops.linear_small_m`` where ``ops.can_gemv`` (bf16/fp16,
    1..8 rows); on the CPU, ``linear_packed`` where ``can_pack`` (float32 with oneDNN,
    no gradient wanted), else for 2-D input of at most ``WXT_MAX_ROWS`` rows
    ``linear_wxt``."""

    _packed: PackedWeight | None = None
    _pack_failed = False  # this torch refused to pack: keep the unpacked forms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and ops.can_gemv(x, self.weight):
            return ops.linear_small_m(x, self.weight, self.bias)
        if x.is_cuda:
            return F.linear(x, self.weight, self.bias)
        if x.dtype == torch.float32 and not self._pack_failed and can_pack(self.weight) \
                and not (torch.is_grad_enabled() and self.weight.requires_grad):
            packed = self.packed_weight()
            if packed is not None:
                return linear_packed(x, packed, self.bias)
        if x.dim() != 2 or x.shape[0] > WXT_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        return linear_wxt(x, self.weight, self.bias)

    def packed_weight(self) -> PackedWeight | None:
        """The oneDNN copy of ``weight``, made on first use and remade when the weight
        changed since; None if this torch cannot pack it. Mutates ``self._packed`` (the
        cached copy) and ``self._pack_failed``."""
        if self._packed is None or not self._packed.matches(self.weight):
            try:
                self._packed = pack_weight(self.weight)
            except RuntimeError:
                self._packed, self._pack_failed = None, True
        return self._packed
