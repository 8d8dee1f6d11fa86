"""L2 prefetch riding on a short kernel: spare programs that pull the next weight into L2.

A decode step of a small batch streams every weight once, so its floor is HBM
bandwidth; but between two weight-streaming GEMVs come short kernels (RMSNorm, RoPE
and the KV store, attention, SiLU-mul) during which HBM idles for a few
microseconds each. A short kernel can be given extra programs that do nothing but
ask the TMA unit to fetch the first ``nbytes`` of the *next* GEMV's weight into L2
(``cp.async.bulk.prefetch.L2``, Hopper and later): the bytes are read while HBM
would otherwise idle, and the GEMV then finds them in L2.

A prefetch program reads nothing that an earlier kernel writes and writes nothing,
so it skips ``pdl_enter`` and runs as soon as it is placed (during the previous
kernel's tail, under PDL). It has no effect on any result: it is a hint, and off
where PDL is off (CPU tensors, the interpreter, GPUs before sm_90).

Host side: ``plan`` turns (weight, byte budget) into a ``Prefetch`` (how many extra
programs, how many bytes each lane asks for); the kernel adds ``programs`` to its
grid and calls ``l2_prefetch`` in them.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.kernels.pdl import use_pdl

PROGRAMS = 32  # extra programs per prefetching launch
ALIGN = 16  # bulk prefetch sizes and addresses are multiples of 16 bytes


@dataclass(frozen=True)
class Prefetch:
    """What one launch prefetches: ``programs`` programs of ``lanes`` lanes, lane
    ``i`` of program ``p`` asking for bytes ``[(p * lanes + i) * chunk, + chunk)``
    of ``target``."""

    target: torch.Tensor
    programs: int
    lanes: int
    chunk: int  # bytes per lane, a multiple of ALIGN

    @property
    def nbytes(self) -> int:
        return self.programs * self.lanes * self.chunk


def plan(target: torch.Tensor | None, nbytes: int, lanes: int,
         programs: int = PROGRAMS) -> Prefetch | None:
    """The prefetch of (about) the first ``nbytes`` of ``target`` by ``programs``
    programs of ``lanes`` lanes, rounded down so every lane asks for the same
    multiple of 16 bytes; None when there is nothing to do (no target, no budget,
    not a CUDA sm_90+ tensor, a target not 16-byte aligned or not contiguous).
    Pure."""
    if target is None or nbytes <= 0 or not use_pdl(target) or not target.is_contiguous():
        return None
    if target.data_ptr() % ALIGN:
        return None
    nbytes = min(nbytes, target.numel() * target.element_size())
    chunk = nbytes // (programs * lanes) // ALIGN * ALIGN
    if chunk == 0:
        return None
    return Prefetch(target, programs, lanes, chunk)


def launch_args(p: Prefetch | None, like: torch.Tensor) -> tuple:
    """``(pointer tensor, chunk, programs, PF constexpr)`` for a kernel's argument list;
    with no prefetch, ``like`` stands in as a pointer that is never used."""
    if p is None:
        return like, 0, 0, False
    return p.target, p.chunk, p.programs, True


@triton.jit
def l2_prefetch(base_ptr, chunk, part, LANES: tl.constexpr):
    """Program ``part``'s share: each of ``LANES`` lanes issues one bulk L2 prefetch of
    ``chunk`` bytes. No result, no write."""
    lane = tl.arange(0, LANES)
    offs = (part * LANES + lane).to(tl.int64) * chunk
    ptrs = base_ptr.to(tl.pointer_type(tl.int8)) + offs
    sizes = lane * 0 + chunk
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
        "=r,l,r", [ptrs, sizes], dtype=tl.int32, is_pure=False, pack=1)


__all__ = ["ALIGN", "PROGRAMS", "Prefetch", "l2_prefetch", "launch_args", "plan"]
