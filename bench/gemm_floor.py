"""The GEMM floor of a decode step: the time of its matrix products alone.

One decode step of ``batch`` sequences multiplies ``batch`` rows by every linear
weight of the model (each layer's projections, then lm_head). Any engine doing that
step with torch on this machine pays at least the fastest of these calls, weights
cold (each read once per step, in the model's order, as a real step does)::

    F.linear(x, W)          W [out, in] as loaded (what transformers runs)
    mm(x, Wt)               Wt = W^T made contiguous [in, out]
    (W @ x^T)^T             engine.linear.linear_wxt (pdserve's CPU form without oneDNN)
    oneDNN packed           engine.linear.linear_packed (pdserve's CPU form with oneDNN)

Pure measurement: reads the weights, allocates its own inputs, transposed and packed copies.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.linear import can_pack, linear_packed, linear_wxt, pack_weight


@dataclass(frozen=True)
class GemmFloor:
    batch: int
    num_gemms: int  # matrix products in one step
    form_ms: tuple[tuple[str, float], ...]  # (call form, best step time in ms)

    @property
    def best_form(self) -> str:
        return min(self.form_ms, key=lambda f: f[1])[0]

    @property
    def step_ms(self) -> float:
        return min(ms for _, ms in self.form_ms)


def decode_weights(model: nn.Module) -> list[torch.Tensor]:
    """Every ``nn.Linear`` weight ``[out, in]`` in the order a step runs them (module
    registration order: layer by layer, lm_head last). Pure."""
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]


def measure(weights: list[torch.Tensor], batch: int, repeats: int = 5) -> GemmFloor:
    """Best-of-``repeats`` time of one step's GEMMs per call form, the forms taking
    turns in each round so that they share the machine's noise. Pure but for time."""
    gen = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(batch, k, generator=gen) for k in {w.shape[1] for w in weights}}
    transposed = [w.t().contiguous() for w in weights]
    forms: dict[str, Callable[[int], torch.Tensor]] = {
        "F.linear(x, W)": lambda i: F.linear(inputs[weights[i].shape[1]], weights[i]),
        "mm(x, Wt)": lambda i: torch.mm(inputs[weights[i].shape[1]], transposed[i]),
        "(W @ x^T)^T": lambda i: linear_wxt(inputs[weights[i].shape[1]], weights[i]),
    }
    if all(can_pack(w) for w in weights):
        packed = [pack_weight(w) for w in weights]
        forms["oneDNN packed"] = lambda i: linear_packed(inputs[weights[i].shape[1]], packed[i])
    best = {name: float("inf") for name in forms}
    with torch.inference_mode():
        for rnd in range(repeats + 1):  # round 0 warms up, uncounted
            for name, call in forms.items():
                t = time.perf_counter()
                for i in range(len(weights)):
                    call(i)
                if rnd:
                    best[name] = min(best[name], (time.perf_counter() - t) * 1e3)
    return GemmFloor(batch, len(weights), tuple((n, round(ms, 2)) for n, ms in best.items()))
