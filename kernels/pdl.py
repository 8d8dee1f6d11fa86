"""Programmatic dependent launch (PDL): a kernel's launch overlaps the tail of the one
before it on the stream (Hopper and later).

A decode step of a small batch is ~300 short kernels back to back; between two of
them the GPU drains one grid, then launches and places the next. Launched with PDL,
the next kernel's programs may start as soon as every program of the previous one
has signalled (``gdc_launch_dependents``); each then blocks in ``gdc_wait`` until
the previous kernel has finished and its writes are visible. So a PDL kernel must
do nothing before ``gdc_wait`` that reads what an earlier kernel writes, or writes
anything at all (its output may be memory an earlier kernel still reads).
``pdl_enter`` is that prologue, at the top of a kernel (the decode attention reads
its step inputs, the context lengths and block ids, ahead of it): wait, then signal, so
that only the one kernel after the running one is resident early (signalling
before the wait let a chain of waiting kernels take SM slots: H200 batch-1 decode
graph 4.69 ms against 4.41 without PDL). Kernels launched without PDL, and torch's
own, keep full stream order, so mixing is safe.

CUDA graph capture keeps the dependency (programmatic edges). The interpreter has
no PDL: CPU tensors launch with it off.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.lru_cache(maxsize=16)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL: CUDA, compute capability 9+."""
    if not t.is_cuda:
        return False
    return _capable(t.device.index if t.device.index is not None
                    else torch.cuda.current_device())


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Kernel prologue: wait for the previous kernel, then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
