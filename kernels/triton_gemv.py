"""Skinny GEMM for decode steps: ``y = x @ W^T (+ bias)`` for ``x`` of 1..8 rows.

``x`` ``[M, K]``, ``weight`` ``[N, K]`` (``torch.nn.Linear`` layout, each row contiguous
along K), ``y`` ``[M, N]``; bf16/fp16 in, fp32 accumulation. At M <= 8 the work is
reading W once, so the kernel is a weight stream: the grid tiles N by ``BLOCK_N`` rows
and each program walks its ``[BLOCK_N, K]`` slab of W in ``[BLOCK_N, BLOCK_K]`` tiles
(16-byte loads along K), multiplying by the tiny, cache-resident ``x``::

      W [N, K]                          x [M, K]
      +---------------------------+
      | pid 0: BLOCK_N rows  ---> |  .  each tile [BLOCK_N, BLOCK_K] . x rows
      | pid 1                ---> |     -> out[:, pid * BLOCK_N : (pid + 1) * BLOCK_N]
      | ...                       |
      +---------------------------+

The tile times x^T, padded to 16 columns, runs on the tensor cores; ``num_stages``
pipelines the W tiles through shared memory (cp.async), so several tiles per program
are in flight. Padding rows of x are masked (never read).

Split-K (``split_k`` > 1): the grid is (N tiles, splits); each
program streams ``K / split_k`` of its rows and writes an fp32 partial to a workspace;
the program that draws the last ticket of its N tile (a per-tile counter, left zero
again) sums the partials in split order (deterministic), adds the bias and stores.
It exists for the shapes whose N gives about one program per SM (H200, M=1: o_proj
and down_proj at 16-32 rows per program streamed at 0.45-0.65x the copy rate, lm_head
with 4000 programs at 1.0x; it made no measurable difference at N=4096).

``gemv_glu`` is the same stream over a fused gate/up weight ``[2I, K]`` (gate rows
first) with ``silu(gate) * up`` in the epilogue: a program takes ``BLOCK_N / 2`` gate
rows and the up rows of the same columns, so each output column's pair is in one
program's accumulator, and it writes ``[M, I]``, rounding as ``gemv`` followed by
``triton_fused.silu_and_mul`` do (the same bits). One kernel instead of two per MLP.

Shapes in ``SM90_PICKS`` (Llama-3-8B's, and so Llama-3.x/Mistral-7B's) use a fixed
config on sm_90, measured inside the batch-1 decode graph on the H200
(``bench/gemv_insitu_h200.py``): there the GEMVs run back to back under PDL, and
isolated autotuning both favoured 16-row tiles that lose in the chain and picked
differently from run to run (the gate/up pick alone moved the graph by 0.14 ms).
For any other shape, the first eager call runs ``triton.autotune`` over ``CONFIGS``
(L2 flushed between runs) and remembers its pick for every
M; later calls launch that config directly (no autotuner on the hot path). One config
for every M makes the result batch-invariant: an output row is the same bits whether
its x row came alone or with 7 others (each output column of a dot sums over K in an
order that does not depend on the other columns), so a seeded request samples the
same tokens in any batch (per M-bucket picks broke that on the H200). A call made
while a CUDA graph is being captured never autotunes: it uses the remembered pick, or
``default_config`` if the shape was never run eagerly. The launch has no host sync,
so it captures as is.

Public names: ``gemv``, ``gemv_glu``, ``GemvConfig``, ``CONFIGS``, ``SM90_PICKS``,
``preset_config``, ``default_config``, ``chosen_configs``, ``MAX_ROWS``.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
import triton.testing

from pdserve.kernels.pdl import pdl_enter, use_pdl

MAX_ROWS = 8  # the largest M this kernel takes


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1


# Modest on purpose: every entry compiles once per dtype and is timed once per weight
# shape, the first time the engine warms up.
CONFIGS = (
    GemvConfig(16, 256, 4, 4),  # tensor cores, W tiles pipelined through smem
    GemvConfig(16, 512, 4, 3),
    GemvConfig(32, 256, 4, 4),
    GemvConfig(32, 128, 4, 6),
    GemvConfig(64, 128, 4, 4),
    GemvConfig(16, 256, 4, 4, 2),  # split-K: more programs for small N
    GemvConfig(16, 256, 4, 4, 4),
    GemvConfig(32, 128, 4, 6, 2),
    GemvConfig(32, 128, 4, 6, 4),
    GemvConfig(32, 256, 4, 4, 4),
    GemvConfig(16, 128, 4, 6, 8),
)
MAX_SPLIT_K = max(c.split_k for c in CONFIGS)

# (N, K) -> the config that made the H200's batch-1 decode graph fastest, trying per
# shape every entry of CONFIGS and ten more (64- and 32-row tiles with deeper pipelines)
# in the graph: gemv_insitu_h200_5b611b5.json, 4.061 ms against 4.141 with the picks
# of the round before (gemv_insitu_h200.json, CONFIGS only: 4.271 against 4.344
# autotuned, on another H200)
SM90_PICKS = {
    (6144, 4096): GemvConfig(64, 128, 4, 6),  # QKV (32 query, 8 KV heads of 128)
    (4096, 4096): GemvConfig(32, 128, 4, 8),  # o_proj
    (28672, 4096): GemvConfig(64, 128, 4, 4),  # gate/up of FFN 14336
    (4096, 14336): GemvConfig(64, 128, 4, 6, 2),  # down_proj
    (128256, 4096): GemvConfig(64, 128, 4, 4),  # lm_head
}


def preset_config(n: int, k: int, dtype: torch.dtype,
                  capability: tuple[int, int]) -> GemvConfig | None:
    """The fixed pick for this shape on this GPU generation, or None (autotune). Pure."""
    if capability[0] != 9 or dtype not in (torch.bfloat16, torch.float16):
        return None
    return SM90_PICKS.get((n, k))


def default_config(n: int, k: int) -> GemvConfig:
    """Untimed choice (used only when a graph is captured before any eager call)."""
    return CONFIGS[0]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, ws_ptr, tickets_ptr, M, N, K,
                 stride_xm, stride_wn, stride_om,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, PDL: tl.constexpr, GLU: tl.constexpr = False,
                 PF_BYTES: tl.constexpr = 0):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past N read row N - 1 (valid memory, no mask on the W stream); not stored
    rows_w = tl.minimum(offs_n, N - 1).to(tl.int64)
    if GLU:  # rows r < BLOCK_N / 2: gate of column c(r); the rest: up of the same columns
        half_n = N // 2
        offs_r = tl.arange(0, BLOCK_N)
        cols = tl.minimum(pid * (BLOCK_N // 2) + offs_r % (BLOCK_N // 2), half_n - 1)
        rows_w = (cols + (offs_r // (BLOCK_N // 2)) * half_n).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows_w[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    bias = tl.zeros([BLOCK_N], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    offs_m = tl.arange(0, 16)  # x^T padded to the 16 columns a dot needs
    m_mask = offs_m < M
    xt_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # [BLOCK_K, 16]
    k_start = 0
    k_end = K
    if SPLIT_K > 1:  # this program's share of K, whole tiles
        k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = tl.program_id(1) * k_per
        k_end = tl.minimum(K, k_start + k_per)
        w_ptrs += k_start
        xt_ptrs += k_start
    if PF_BYTES > 0:  # W does not depend on the kernel ahead: ask for its start now
        _prefetch_rows_l2(w_ptr, rows_w * stride_wn + k_start, PF_BYTES, BLOCK_N)
    pdl_enter(PDL)  # everything above reads only weights; x is written by the kernel ahead
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            xt = tl.load(xt_ptrs, mask=m_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + offs_k) < k_end
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            xt = tl.load(xt_ptrs, mask=m_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K
        xt_ptrs += BLOCK_K
    out_mask = m_mask[None, :] & (offs_n[:, None] < N)
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    if SPLIT_K > 1:
        # partial of split s at ws[s, m, W row]; the last of the tile's splits sums them
        # (a GLU program's clamped rows repeat a row of its own, with the same values)
        tile = offs_m[None, :] * N + rows_w[:, None]  # [BLOCK_N, 16]
        ws_mask = m_mask[None, :] if GLU else out_mask
        tl.store(ws_ptr + tl.program_id(1) * M * N + tile, acc, mask=ws_mask)
        tl.debug_barrier()  # every thread's partial precedes the ticket's release
        counter = tickets_ptr + pid
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_N, 16], tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(ws_ptr + s * M * N + tile, mask=ws_mask, other=0.0,
                               cache_modifier=".cg")
            if HAS_BIAS:
                acc += bias[:, None]
            _store(acc, out_ptr, out_ptrs, out_mask, offs_m, m_mask, stride_om, pid, N,
                   BLOCK_N, GLU)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # for the next launch
    else:
        if HAS_BIAS:
            acc += bias[:, None]
        _store(acc, out_ptr, out_ptrs, out_mask, offs_m, m_mask, stride_om, pid, N, BLOCK_N,
               GLU)


@triton.jit
def _prefetch_rows_l2(w_ptr, offs, PF_BYTES: tl.constexpr, ROWS: tl.constexpr):
    """Bulk-prefetch into L2 the ``PF_BYTES`` bytes from element ``offs[r]`` of each of
    ``ROWS`` rows (``cp.async.bulk.prefetch.L2``, sm_90+; 16-byte aligned, a multiple of
    16 bytes). A hint: no result, no write."""
    esize: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
    ptrs = w_ptr.to(tl.pointer_type(tl.int8)) + offs * esize
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
        [ptrs, tl.full([ROWS], PF_BYTES, tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _store(acc, out_ptr, out_ptrs, out_mask, offs_m, m_mask, stride_om, pid, N,
           BLOCK_N: tl.constexpr, GLU: tl.constexpr):
    """Store a program's ``[BLOCK_N, 16]`` result; with ``GLU``, its gate half and up
    half as ``silu(gate) * up`` into ``BLOCK_N / 2`` columns of ``[M, N / 2]``, each
    factor rounded to the output dtype first (``gemv`` then ``silu_and_mul``)."""
    dt = out_ptr.dtype.element_ty
    if GLU:
        pair = tl.permute(tl.reshape(acc, [2, BLOCK_N // 2, 16]), (1, 2, 0))
        g, u = tl.split(pair)  # [BLOCK_N / 2, 16] each
        g = g.to(dt).to(tl.float32)
        u = u.to(dt).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        cols = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + offs_m[None, :] * stride_om + cols[:, None], (s * u).to(dt),
                 mask=m_mask[None, :] & (cols[:, None] < N // 2))
    else:
        tl.store(out_ptrs, acc.to(dt), mask=out_mask)


def _triton_config(c: GemvConfig) -> triton.Config:
    return triton.Config({"BLOCK_N": c.block_n, "BLOCK_K": c.block_k,
                          "SPLIT_K": c.split_k},
                         num_warps=c.num_warps, num_stages=c.num_stages)


def _prune(configs, nargs, **kwargs):
    """Split-K configs only where every split gets at least one tile of K."""
    k = nargs["K"]
    return [c for c in configs if k >= c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"]]


def _even_k(k: int, block_k: int, split_k: int) -> bool:
    """Every program's K range is whole tiles (no K mask needed)."""
    return k % (block_k * split_k) == 0


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_gemv_autotuned = triton.autotune(
    configs=[_triton_config(c) for c in CONFIGS], key=["N", "K"],
    prune_configs_by={"early_config_prune": _prune}, do_bench=_bench,
)(triton.heuristics({"EVEN_K": lambda a: _even_k(a["K"], a["BLOCK_K"], a["SPLIT_K"])})(
    _gemv_kernel))

# (N, K, dtype, device index) -> the config autotuning picked (for every M)
_chosen: dict[tuple, GemvConfig] = {}


def chosen_configs() -> dict[tuple, GemvConfig]:
    """A copy of the picks made so far, keyed ``(N, K, dtype, device index)``."""
    return dict(_chosen)


def _from_triton(c: triton.Config) -> GemvConfig:
    return GemvConfig(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages,
                      c.kwargs["SPLIT_K"])


def _grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])


# device -> (partials fp32, tickets int32): split-K scratch shared by every call on that
# device (calls on one stream run one after another; each launch leaves the tickets zero)
_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for ``MAX_SPLIT_K`` partials of ``[m, n]`` and a ticket per 16-row tile,
    grown when a larger shape comes (normally during the eager warm-up, before any graph
    capture). Mutates the module's workspace record."""
    need_ws, need_t = MAX_SPLIT_K * MAX_ROWS * n, triton.cdiv(n, 16)
    ws = _workspaces.get(device)
    if ws is None or ws[0].numel() < need_ws or ws[1].numel() < need_t:
        old = (0, 0) if ws is None else (ws[0].numel(), ws[1].numel())
        ws = (torch.empty(max(need_ws, old[0]), dtype=torch.float32, device=device),
              torch.zeros(max(need_t, old[1]), dtype=torch.int32, device=device))
        _workspaces[device] = ws
    return ws


def _check(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The operands' contract (see ``gemv``); returns ``x`` with stride 1 along K."""
    m, k = x.shape
    assert 1 <= m <= MAX_ROWS, f"gemv takes 1..{MAX_ROWS} rows, got {m}"
    assert weight.shape[1] == k and weight.stride(1) == 1, "weight must be [N, K], K-contiguous"
    assert x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16), \
        (x.dtype, weight.dtype)
    return x if x.stride(1) == 1 else x.contiguous()


def _config_for(n: int, k: int, x: torch.Tensor, autotune) -> tuple[GemvConfig, bool]:
    """The config for (N, K) on x's device: remembered, the sm_90 preset, the default
    inside a graph capture, or autotuned now by ``autotune()`` (which runs the plain
    kernel); and whether ``autotune`` ran. Mutates the module's record of picks."""
    key = (n, k, x.dtype, x.device.index)
    config = _chosen.get(key)
    if config is None and x.is_cuda:
        config = preset_config(n, k, x.dtype, torch.cuda.get_device_capability(x.device))
    ran = False
    if config is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return default_config(n, k), False  # never time inside a capture
        autotune()
        config, ran = _from_triton(_gemv_autotuned.best_config), True
    _chosen[key] = config
    return config, ran


# bytes of each W row a program asks L2 for before waiting on the kernel ahead (0: off).
# H200, Llama-3-8B batch-1 engine step (bench/gemv_prefetch_h200.py, 5 rounds): 512
# 4.288 ms, 256 4.290, none 4.309-4.312, 768 4.311, 1024 4.369, 4096 5.121
PREFETCH_ROW_BYTES = 512


def _prefetch_bytes(weight: torch.Tensor, config: GemvConfig) -> int:
    """``PREFETCH_ROW_BYTES`` within the smallest split's share of a row, in 16-byte
    units; 0 where a row or a split's start is not 16-byte aligned (the prefetch's
    rule). Pure."""
    k, esize = weight.shape[1], weight.element_size()
    k_per = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    if weight.data_ptr() % 16 or (weight.stride(0) * esize) % 16 or (k_per * esize) % 16:
        return 0
    share = min(k_per, k - (config.split_k - 1) * k_per) * esize
    return max(0, min(PREFETCH_ROW_BYTES, share)) // 16 * 16


def _launch(args: tuple, config: GemvConfig, n: int, k: int, x: torch.Tensor, has_bias: bool,
            glu: bool) -> None:
    _gemv_kernel[(triton.cdiv(n, config.block_n), config.split_k)](
        *args, BLOCK_N=config.block_n, BLOCK_K=config.block_k, HAS_BIAS=has_bias,
        EVEN_K=_even_k(k, config.block_k, config.split_k), SPLIT_K=config.split_k,
        num_warps=config.num_warps, num_stages=config.num_stages, PDL=use_pdl(x),
        launch_pdl=use_pdl(x), GLU=glu,
        PF_BYTES=_prefetch_bytes(args[1], config) if use_pdl(x) else 0)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """``x @ weight^T (+ bias)``: x ``[M, K]`` (1 <= M <= 8), weight ``[N, K]`` with
    stride 1 along K, bias ``[N]``, all one dtype (bf16 or fp16); fp32 accumulation.
    Writes ``out`` ``[M, N]`` (allocated when None; its last stride must be 1) and
    returns it. ``config`` forces a variant (tests, sweeps); otherwise see the module
    doc. Mutates ``out`` and, on a shape's first eager call, the module's record of
    autotuning picks; no host sync (graph-capturable)."""
    x = _check(x, weight)
    m, k = x.shape
    n = weight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.stride(1) == 1
    has_bias = bias is not None
    partials, tickets = _workspace(x.device, m, n)
    args = (x, weight, bias if has_bias else out, out, partials, tickets, m, n, k, x.stride(0),
            weight.stride(0), out.stride(0))
    if config is None:
        config, ran = _config_for(n, k, x, lambda: _gemv_autotuned[_grid(n)](
            *args, HAS_BIAS=has_bias, PDL=False))
        if ran:
            return out  # autotuning ran the kernel: out is written
    _launch(args, config, n, k, x, has_bias, glu=False)
    return out


def gemv_glu(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
             config: GemvConfig | None = None) -> torch.Tensor:
    """``silu(x @ gate^T) * (x @ up^T)`` where ``weight`` ``[2I, K]`` is ``[gate; up]``
    (the fused gate/up projection), x ``[M, K]`` as for ``gemv``; the same bits as
    ``silu_and_mul(gemv(x, weight))``. Writes ``out`` ``[M, I]`` (allocated when None)
    and returns it. The config is the one ``gemv`` uses for ``weight``'s shape (autotuned
    on the plain kernel if there is none yet); ``config`` forces one whose ``block_n``
    halves evenly. Mutates ``out`` and the module's record of picks; no host sync."""
    x = _check(x, weight)
    m, k = x.shape
    n = weight.shape[0]
    assert n % 2 == 0, "a fused gate/up weight has an even number of rows"
    if out is None:
        out = torch.empty(m, n // 2, dtype=x.dtype, device=x.device)
    assert out.shape == (m, n // 2) and out.stride(1) == 1
    partials, tickets = _workspace(x.device, m, n)
    if config is None:
        def autotune():
            y = torch.empty(m, n, dtype=x.dtype, device=x.device)
            _gemv_autotuned[_grid(n)](x, weight, y, y, partials, tickets, m, n, k, x.stride(0),
                                      weight.stride(0), y.stride(0), HAS_BIAS=False, PDL=False)

        config, _ = _config_for(n, k, x, autotune)
    assert config.block_n % 2 == 0
    args = (x, weight, out, out, partials, tickets, m, n, k, x.stride(0), weight.stride(0),
            out.stride(0))
    _launch(args, config, n, k, x, False, glu=True)
    return out
