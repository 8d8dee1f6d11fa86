"""What reading N bytes costs one kernel launch on this GPU: the floor for a
latency-bound kernel such as batch-1 decode (16.8 MB at 4096 tokens).

The device-to-device copy rate is measured on 1 GiB, where launch and ramp-up
are noise. At 16.8 MB they are not: a kernel that only reads the bytes (an
integer sum per program, one store each) pays the launch, the first round
trip to memory, the stream and the tail. ``read_floor`` times such kernels
over a few grid and tile sizes (``triton.testing.do_bench``, L2 flushed, as
the decode timings are) and returns the fastest, eager and in a CUDA graph,
beside an empty kernel (the launch alone).
"""

import torch
import triton
import triton.language as tl
from triton.testing import do_bench


@triton.jit
def _read_kernel(x_ptr, out_ptr, per_prog, BLOCK: tl.constexpr):
    base = x_ptr + tl.program_id(0).to(tl.int64) * per_prog
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(0, per_prog, BLOCK):
        acc += tl.load(base + i + tl.arange(0, BLOCK), cache_modifier=".cg")
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


@triton.jit
def _empty_kernel(out_ptr):
    tl.store(out_ptr + tl.program_id(0), 0)


def _graph_of(fn) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def read_floor(nbytes: int, device: str = "cuda") -> dict:
    """Fastest read of ``nbytes`` (a multiple of 64 KiB) over grids of 128..1024
    programs and tiles of 1024 / 4096 int32, eager and in a graph; and an empty
    launch. Times in ms; allocates ``nbytes`` on ``device``."""
    words = nbytes // 4
    x = torch.randint(-1000, 1000, (words,), dtype=torch.int32, device=device)
    out = torch.empty(1024, dtype=torch.int32, device=device)
    tried = []
    for grid in (128, 256, 512, 1024):
        per = words // grid
        for block, warps in ((1024, 4), (4096, 8)):
            if block > per or per % block:
                continue
            fn = (lambda grid=grid, per=per, block=block, warps=warps:
                  _read_kernel[(grid,)](x, out, per, BLOCK=block, num_warps=warps))
            fn()
            assert int(out[:grid].sum()) == int(x.sum()), "read kernel summed wrongly"
            tried.append({"grid": grid, "block": block, "warps": warps, "ms": _ms(fn),
                          "graph_ms": _ms(_graph_of(fn).replay)})
    empty = lambda: _empty_kernel[(1,)](out)  # noqa: E731
    best = min(tried, key=lambda r: r["graph_ms"])
    return {"bytes": nbytes, "best_graph": best, "best_eager": min(tried, key=lambda r: r["ms"]),
            "graph_tbps": nbytes / best["graph_ms"] / 1e9, "tried": tried,
            "empty_kernel_ms": _ms(empty), "empty_kernel_graph_ms": _ms(_graph_of(empty).replay)}
