"""Kernel checks and timings on one GPU (written for the H200), in one process.

    PYTHONPATH=<dir holding pdserve> python3 bench/kernels_h200.py [--rev SHA] [--sweep]

1. Ceiling: HBM device-to-device copy bandwidth (bytes read + written).
2. Checks: every Triton kernel against its torch reference on fresh random
   inputs (bf16, fp16, fp32), outputs poisoned with NaN, unused cache slots
   NaN, relative error in float64; the decode launch captured in a CUDA graph.
3. Timings (``triton.testing.do_bench`` median, L2 flushed between runs), bf16,
   32 q / 8 kv heads, head dim 128, block size 16:
   decode (KV bytes/s vs torch SDPA on the same KV laid out contiguously),
   prefill (causal TFLOP/s vs SDPA flash on the same work), store_kv and
   pack/unpack (bytes/s vs the copy bandwidth). ``--sweep`` also times other
   launch shapes and records them; ``--b1-sweep`` only the batch-1 decode, over
   block_n 32/64/128 or one tile per partition, 2/4/8 warps, 1-3 stages, and
   partitions of 64/128/256 tokens
   (plus the default launch; ``best_graph`` is the fastest CUDA-graph replay).
   The batch-1 row also gets the read floor (``read_floor.py``): the fastest
   kernel that merely reads the same bytes, and an empty launch.

Prints a table last; writes ``kernels_h200.json`` to $OUT (if set) or bench/results.
``--plot bench/results/kernels_h200.json`` draws the decode sweep (no GPU needed).
"""

import argparse
import datetime
import itertools
import json
import os
import random
import subprocess
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from pdserve.bench.read_floor import read_floor
from pdserve.kernels import reference
from pdserve.kernels.triton_blocks import pack_blocks, unpack_blocks
from pdserve.kernels.triton_decode import (
    DecodeTuning,
    DecodeWorkspace,
    default_tuning,
    paged_decode_attention,
)
from pdserve.kernels.triton_prefill import PrefillTuning, paged_prefill_attention
from pdserve.kernels.triton_store import store_kv

HQ, HKV, D, BS = 32, 8, 128, 16
DEV = "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def ms(fn, rep=100) -> float:
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def paged(lens, dtype, hkv=HKV, d=D, bs=BS):
    """Random paged K/V for ``lens``, blocks handed out in random order."""
    nblocks = [-(-n // bs) for n in lens]
    total = sum(nblocks) + 2
    perm = torch.randperm(total)
    tables = torch.randint(0, total, (len(lens), max(nblocks)), dtype=torch.int32)
    first = 0
    for i, nb in enumerate(nblocks):
        tables[i, :nb] = perm[first:first + nb].to(torch.int32)
        first += nb
    k = torch.randn(total, bs, hkv, d, device=DEV, dtype=dtype)
    v = torch.randn(total, bs, hkv, d, device=DEV, dtype=dtype)
    return k, v, tables.to(DEV)


def poison_unused(k, v, tables, lens):
    """NaN into every slot outside the contexts: a kernel that reads one returns NaN."""
    bs = k.shape[1]
    used = torch.zeros(k.shape[:2], dtype=torch.bool, device=DEV)
    for i, n in enumerate(lens):
        slots = tables[i, :, None].long() * bs + torch.arange(bs, device=DEV)
        used.view(-1)[slots.reshape(-1)[:n]] = True
    k[~used] = float("nan")
    v[~used] = float("nan")


def contiguous_kv(cache, tables, length):
    """[NB, B, H, D] paged -> [N, H, L, D] contiguous (the SDPA layout)."""
    n = tables.shape[0]
    return cache[tables.long()].reshape(n, -1, cache.shape[2], cache.shape[3])[:, :length] \
        .transpose(1, 2).contiguous()


# ---------------------------------------------------------------- checks

def check_decode(dtype, d, bs, lens, tuning=None):
    k, v, tables = paged(lens, dtype, d=d, bs=bs)
    q = torch.randn(len(lens), HQ, d, device=DEV, dtype=dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    ref = reference.paged_decode_attention(q.float(), k.float(), v.float(), tables, ctx, d ** -0.5)
    poison_unused(k, v, tables, lens)
    out = torch.full_like(q, float("nan"))
    parts = -(-tables.shape[1] * bs // 64)  # enough for any partition_size >= 64
    ws = DecodeWorkspace.allocate(len(lens), HQ, HKV, d, parts, DEV)
    ws.partials.fill_(float("nan"))
    errs = []
    for _ in range(2):  # the second launch reuses the tickets the first left zero
        paged_decode_attention(q, k, v, tables, ctx, d ** -0.5, out=out, workspace=ws,
                               tuning=tuning)
        errs.append(rel_err(out, ref) if not ws.tickets.any() else float("inf"))
        out.fill_(float("nan"))
    return max(errs)


def check_prefill(dtype, d, bs, q_lens, prefix):
    ctxs = [a + b for a, b in zip(q_lens, prefix, strict=True)]
    k, v, tables = paged(ctxs, dtype, d=d, bs=bs)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32,
                       device=DEV)
    ctx = torch.tensor(ctxs, dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), HQ, d, device=DEV, dtype=dtype)
    ref = reference.paged_prefill_attention(q.float(), k.float(), v.float(), tables, qsl, ctx,
                                            d ** -0.5)
    poison_unused(k, v, tables, ctxs)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k, v, tables, qsl, ctx, d ** -0.5, out=out)
    return rel_err(out, ref)


def check_copies(dtype):
    t, nb = 3000, 400
    key = torch.randn(t, HKV, D, device=DEV, dtype=dtype)
    val = torch.randn(t, HKV, D, device=DEV, dtype=dtype)
    slots = torch.randperm(nb * BS, device=DEV)[:t]
    kc = torch.full((nb, BS, HKV, D), float("nan"), device=DEV, dtype=dtype)
    vc = kc.clone()
    kr, vr = kc.clone(), vc.clone()
    store_kv(key, val, kc, vc, slots)
    reference.store_kv(key, val, kr, vr, slots)
    ok = torch.equal(kc.nan_to_num(7.0), kr.nan_to_num(7.0))
    ok &= torch.equal(vc.nan_to_num(7.0), vr.nan_to_num(7.0))
    ids = torch.randperm(nb, device=DEV)[:150]
    kc, vc = torch.randn_like(kc), torch.randn_like(vc)
    out = torch.full((2, 150, BS, HKV, D), float("nan"), device=DEV, dtype=dtype)
    pack_blocks(kc, vc, ids, out)
    ok &= torch.equal(out, reference.pack_blocks(kc, vc, ids))
    buf = torch.randn_like(out)
    kr, vr = kc.clone(), vc.clone()
    unpack_blocks(buf, kc, vc, ids)
    reference.unpack_blocks(buf, kr, vr, ids)
    return ok and torch.equal(kc, kr) and torch.equal(vc, vr)


def check_cuda_graph():
    lens = [random.randint(1, 3000) for _ in range(8)]
    k, v, tables = paged(lens, torch.bfloat16)
    q = torch.randn(8, HQ, D, device=DEV, dtype=torch.bfloat16)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    paged_decode_attention(q, k, v, tables, ctx, 0.1, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k, v, tables, ctx, 0.1, out=out)
    ctx.copy_(torch.tensor([max(1, n - 5) for n in lens]))
    q.normal_()
    out.fill_(float("nan"))
    graph.replay()
    ref = reference.paged_decode_attention(q.float(), k.float(), v.float(), tables, ctx, 0.1)
    return rel_err(out, ref)


def run_checks():
    """{name: (rel err, tolerance)} and the names that failed."""
    res = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name, tol = str(dtype).split(".")[-1], TOL[dtype]
        for d, bs in ((128, 16), (64, 32)):
            lens = [1, 17, random.randint(1, 4096), random.randint(1, 4096), 4095]
            for label, tuning in (("default", None), ("split128", DecodeTuning(128, 64)),
                                  ("one_tile128", DecodeTuning(128, 128, 8, 1)),
                                  ("split256_merge_kernel",
                                   DecodeTuning(256, 64, fused_reduce=False)),
                                  ("whole", DecodeTuning(4096, 64))):
                res[f"decode/{name}/d{d}/b{bs}/{label}"] = (
                    check_decode(dtype, d, bs, lens, tuning), tol)
            res[f"decode/{name}/d{d}/b{bs}/long"] = (check_decode(dtype, d, bs, [33001]), tol)
            res[f"prefill/{name}/d{d}/b{bs}/ragged"] = (check_prefill(
                dtype, d, bs, [1, 700, 0, random.randint(1, 1500)], [5, 0, 9, 2049]), tol)
            res[f"prefill/{name}/d{d}/b{bs}/2048+2048"] = (
                check_prefill(dtype, d, bs, [2048], [2048]), tol)
        res[f"store+pack/{name}/bit_exact"] = (0.0 if check_copies(dtype) else 1.0, 0.5)
    res["decode/bfloat16/cuda_graph_replay"] = (check_cuda_graph(), TOL[torch.bfloat16])
    failed = sorted(k for k, (e, tol) in res.items() if not e < tol)
    return res, failed


# ---------------------------------------------------------------- timings

def sdpa_decode_ms(q, kc, vc, scale):
    """Best of two exact SDPA formulations on contiguous [N, Hkv, L, D] K/V."""
    n = q.shape[0]
    q_rows = q.view(n, HKV, HQ // HKV, D)  # GQA group as query rows
    q_gqa = q.view(n, HQ, 1, D)
    a = ms(lambda: F.scaled_dot_product_attention(q_rows, kc, vc, scale=scale))
    b = ms(lambda: F.scaled_dot_product_attention(q_gqa, kc, vc, scale=scale, enable_gqa=True))
    return min(a, b), {"grouped_rows_ms": a, "enable_gqa_ms": b}


DECODE_SWEEP = [(64, 4, 3), (64, 4, 2), (128, 4, 2)]
# (block_n, num_warps, num_stages) x fused merge or a merge kernel x partitions
B1_SWEEP = list(itertools.product((32, 64, 128), (2, 4), (2, 3))) + [
    (None, 2, 1), (None, 4, 1), (None, 8, 1)]  # None: one tile
B1_PARTS = (64, 128, 256)  # 512 ran 28-31 us at rev a47fcc6
# --b1-sweep: the latency-bound batch-1 case over more launch shapes (fused merge only,
# partitions of B1_PARTS tokens; the default launch is timed again among them)


def bench_decode(name, lens, sweep, copy_bw, grid=None):
    dtype = torch.bfloat16
    k, v, tables = paged(lens, dtype)
    n = len(lens)
    q = torch.randn(n, HQ, D, device=DEV, dtype=dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    ws = DecodeWorkspace.allocate(n, HQ, HKV, D, -(-tables.shape[1] * BS // 64), DEV)
    scale = D ** -0.5
    kv_bytes = sum(lens) * HKV * D * 2 * 2
    t = ms(lambda: paged_decode_attention(q, k, v, tables, ctx, scale, out=out, workspace=ws))
    row = {"case": name, "lens": lens if n <= 64 else None, "kv_bytes": kv_bytes, "ms": t,
           "tbps": kv_bytes / t / 1e9, "tuning": str(default_tuning(n, HKV, tables.shape[1], BS,
                                                                    q.device)),
           "copy_tbps": copy_bw, "ratio_copy": kv_bytes / t / 1e9 / copy_bw}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k, v, tables, ctx, scale, out=out, workspace=ws)
    row["graph_ms"] = ms(graph.replay)
    if len(set(lens)) == 1:
        kc, vc = contiguous_kv(k, tables, lens[0]), contiguous_kv(v, tables, lens[0])
        t_sdpa, detail = sdpa_decode_ms(q, kc, vc, scale)
        ref = F.scaled_dot_product_attention(q.view(n, HKV, HQ // HKV, D), kc, vc, scale=scale)
        row.update(sdpa_ms=t_sdpa, sdpa_tbps=kv_bytes / t_sdpa / 1e9, ratio_sdpa=t_sdpa / t,
                   sdpa_detail=detail, err_vs_sdpa=rel_err(out.float(), ref.reshape(n, HQ, D)))
        del kc, vc
    if sweep:
        tried = []
        max_tokens = tables.shape[1] * BS
        if grid:
            parts = [p for p in B1_PARTS if p < max_tokens]
        else:
            parts = sorted({p for p in (128, 256, 512, 1024, 2048, 4096) if p < max_tokens}
                           | {max_tokens})
        fused_opts = (True,) if grid else (True, False)
        tunes = [DecodeTuning(part, bn or part, w, s, fused)
                 for (bn, w, s), fused, part
                 in itertools.product(grid or DECODE_SWEEP, fused_opts, parts)
                 if (part < max_tokens or fused)  # one partition: no merge at all
                 and (bn or part) <= part and (bn or part) <= 256]
        default = default_tuning(n, HKV, tables.shape[1], BS, q.device)
        if grid and default not in tunes:
            tunes.append(default)
        for tune in tunes:
            run = lambda tune=tune: paged_decode_attention(q, k, v, tables, ctx, scale, out=out,
                                                           workspace=ws, tuning=tune)
            tt = ms(run, rep=30)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            tried.append({"tuning": str(tune), "ms": tt, "tbps": kv_bytes / tt / 1e9,
                          "graph_ms": ms(graph.replay, rep=30), "default": tune == default})
        row["sweep"] = sorted(tried, key=lambda r: r["ms"])
        row["best_graph"] = min(tried, key=lambda r: r["graph_ms"])  # what a served step sees
    if n == 1:  # latency-bound: also what merely reading these bytes costs one launch
        floor = read_floor(kv_bytes)
        row["read_floor"] = {k: v for k, v in floor.items() if k != "tried"}
        row["ratio_read_floor_graph"] = floor["best_graph"]["graph_ms"] / row["graph_ms"]
    return row


def causal_pairs(new, prefix):
    """(query, key) pairs a causal prefill over a prefix computes: sum of (pos + 1)."""
    return new * prefix + new * (new + 1) // 2


PREFILL_SWEEP = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 3), (64, 64, 4, 3)]


def sdpa_prefill_ms(new, prefix, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, HQ, new, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, HQ, new + prefix, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if prefix == 0:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(new, new + prefix)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return ms(fn)


def bench_prefill(name, q_lens, prefix, sweep):
    dtype = torch.bfloat16
    ctxs = [a + b for a, b in zip(q_lens, prefix, strict=True)]
    k, v, tables = paged(ctxs, dtype)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32,
                       device=DEV)
    ctx = torch.tensor(ctxs, dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), HQ, D, device=DEV, dtype=dtype)
    out = torch.empty_like(q)
    scale = D ** -0.5
    flops = 4 * D * HQ * sum(causal_pairs(a, b) for a, b in zip(q_lens, prefix, strict=True))
    t = ms(lambda: paged_prefill_attention(q, k, v, tables, qsl, ctx, scale, out=out))
    row = {"case": name, "q_lens": q_lens, "prefix": prefix, "flops": flops, "ms": t,
           "tflops": flops / t / 1e9}
    if len(q_lens) == 1:
        try:
            t_sdpa = sdpa_prefill_ms(q_lens[0], prefix[0], scale)
            row.update(sdpa_flash_ms=t_sdpa, sdpa_tflops=flops / t_sdpa / 1e9,
                       ratio_sdpa=t_sdpa / t)
        except RuntimeError as exc:  # no flash kernel for this shape
            row["sdpa_error"] = str(exc)[:300]
    if sweep:
        tried = []
        for bm, bn, w, s in PREFILL_SWEEP:
            tune = PrefillTuning(bm, bn, w, s)
            tt = ms(lambda tune=tune: paged_prefill_attention(
                q, k, v, tables, qsl, ctx, scale, out=out, tuning=tune), rep=50)
            tried.append({"tuning": str(tune), "ms": tt, "tflops": flops / tt / 1e9})
        row["sweep"] = sorted(tried, key=lambda r: r["ms"])
    return row


def bench_copies(copy_bw):
    dtype = torch.bfloat16
    rows = []
    t = 32768
    nb = t // BS + 64
    key = torch.randn(t, HKV, D, device=DEV, dtype=dtype)
    val = torch.randn_like(key)
    blocks = torch.randperm(nb, device=DEV)[: t // BS]
    slots = (blocks[:, None] * BS + torch.arange(BS, device=DEV)).reshape(-1)
    kc = torch.randn(nb, BS, HKV, D, device=DEV, dtype=dtype)
    vc = torch.randn_like(kc)
    nbytes = 2 * 2 * key.numel() * key.element_size()  # K and V, read + write
    tt = ms(lambda: store_kv(key, val, kc, vc, slots))
    tr = ms(lambda: reference.store_kv(key, val, kc, vc, slots))
    rows.append({"case": f"store_kv T={t}", "bytes": nbytes, "ms": tt, "tbps": nbytes / tt / 1e9,
                 "torch_ms": tr})
    nb, n = 16384, 4096
    kc = torch.randn(nb, BS, HKV, D, device=DEV, dtype=dtype)
    vc = torch.randn_like(kc)
    ids = torch.randperm(nb, device=DEV)[:n]
    buf = torch.empty(2, n, BS, HKV, D, device=DEV, dtype=dtype)
    nbytes = 2 * buf.numel() * buf.element_size()
    tt = ms(lambda: pack_blocks(kc, vc, ids, buf))
    tr = ms(lambda: reference.pack_blocks(kc, vc, ids, buf))
    rows.append({"case": f"pack n={n}", "bytes": nbytes, "ms": tt, "tbps": nbytes / tt / 1e9,
                 "torch_ms": tr})
    tt = ms(lambda: unpack_blocks(buf, kc, vc, ids))
    tr = ms(lambda: reference.unpack_blocks(buf, kc, vc, ids))
    rows.append({"case": f"unpack n={n}", "bytes": nbytes, "ms": tt, "tbps": nbytes / tt / 1e9,
                 "torch_ms": tr})
    for r in rows:
        r.update(copy_tbps=copy_bw, ratio_copy=r["tbps"] / copy_bw)
    return rows


def copy_bandwidth() -> float:
    src = torch.randn(512 * 1024 * 1024, device=DEV, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    t = ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / t / 1e9  # TB/s (ms -> 1e9)


def git_rev(arg):
    if arg:
        return arg
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PDSERVE_REV", "unknown")


def plot_decode_sweep(json_path: str) -> str:
    """Decode time against partition size, per case and launch shape (needs a --sweep run)."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        result = json.load(f)
    fig, axes = plt.subplots(1, len(result["decode"]), figsize=(4.2 * len(result["decode"]), 3.6))
    pattern = (r"partition_size=(\d+), block_n=(\d+), num_warps=(\d+), num_stages=(\d+)"
               r"(?:, fused_reduce=(\w+))?")
    for ax, case in zip(axes, result["decode"], strict=True):
        lines = {}
        for row in case.get("sweep", []):
            part, bn, warps, stages, fused = re.search(pattern, row["tuning"]).groups()
            merge = ", merge kernel" if fused == "False" else ""
            label = f"block_n {bn}, {warps} warps, {stages} stages{merge}"
            lines.setdefault(label, []).append((int(part), row["ms"] * 1e3))
        for label, pts in sorted(lines.items()):
            ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=label)
        if "sdpa_ms" in case:
            ax.axhline(case["sdpa_ms"] * 1e3, color="k", ls="--", label="torch SDPA, contiguous")
        ax.set_xscale("log", base=2)
        ax.set_title(case["case"], fontsize=10)
        ax.set_xlabel("partition size (tokens)")
        ax.set_ylabel("us (do_bench median)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"paged decode, {result['gpu']}, rev {result['rev'][:10]}", fontsize=10)
    fig.tight_layout()
    png = json_path.replace(".json", "_decode_sweep.png")
    fig.savefig(png, dpi=110)
    return png


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=None, help="git revision (when the copy has no .git)")
    ap.add_argument("--sweep", action="store_true", help="also time other launch shapes")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--b1-sweep", action="store_true",
                    help="sweep more launch shapes for the batch-1 case only")
    ap.add_argument("--plot", metavar="JSON", help="only plot the decode sweep of a result file")
    args = ap.parse_args()
    if args.plot:
        print("wrote", plot_decode_sweep(args.plot))
        return
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    random.seed(os.urandom(8))
    result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "rev": git_rev(args.rev), "gpu": torch.cuda.get_device_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "triton": __import__("triton").__version__,
              "shape": {"hq": HQ, "hkv": HKV, "head_dim": D, "block_size": BS, "dtype": "bf16"}}
    copy_bw = copy_bandwidth()
    result["copy_tbps"] = copy_bw
    print(f"copy bandwidth {copy_bw:.3f} TB/s", flush=True)
    if not args.skip_checks:
        errs, failed = run_checks()
        result["checks"] = {k: {"rel_err": e, "tol": tol} for k, (e, tol) in errs.items()}
        result["checks_failed"] = failed
        print("checks:", f"FAILED {failed}" if failed else "all passed", flush=True)
        for k, (e, tol) in errs.items():
            print(f"  {k:44} {e:.2e} (tol {tol:.0e})")
    decode_cases = [("decode B=64 L=4096", [4096] * 64), ("decode B=1 L=4096", [4096]),
                    ("decode B=8 L=32768", [32768] * 8),
                    ("decode ragged B=32", [random.randint(64, 8192) for _ in range(32)]),
                    # one partition by default (>= 3 programs per SM): the long ones run alone
                    ("decode ragged B=64", [random.randint(64, 8192) for _ in range(64)])]
    result["decode"] = []
    for name, lens in decode_cases:
        b1 = args.b1_sweep and len(lens) == 1
        result["decode"].append(bench_decode(name, lens, args.sweep or b1, copy_bw,
                                             B1_SWEEP if b1 else None))
        print(json.dumps({k: v for k, v in result["decode"][-1].items() if k != "lens"}),
              flush=True)
    prefill_cases = [("prefill 2048 cached + 2048 new", [2048], [2048]),
                     ("prefill 4096 new", [4096], [0]),
                     ("prefill ragged 4 seqs", [1024, 512, 2048, 300], [0, 3000, 1024, 77])]
    result["prefill"] = []
    for name, q_lens, prefix in prefill_cases:
        result["prefill"].append(bench_prefill(name, q_lens, prefix, args.sweep))
        print(json.dumps(result["prefill"][-1]), flush=True)
    result["copies"] = bench_copies(copy_bw)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "kernels_h200.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)
    print(f"wrote {path}")


def print_table(r):
    cb = r["copy_tbps"]
    print(f"\n{r['gpu']}  rev {r['rev'][:12]}  copy {cb:.2f} TB/s  ({r['date']})")
    print(f"{'case':34} {'ms':>9} {'figure':>14} {'baseline':>16} {'ratio':>7} {'/copy':>6}"
          f" {'graph ms':>9}")
    for d in r["decode"]:
        base = f"{d['sdpa_tbps']:.2f} TB/s SDPA" if "sdpa_tbps" in d else "-"
        ratio = f"{d['ratio_sdpa']:.2f}" if "ratio_sdpa" in d else "-"
        print(f"{d['case']:34} {d['ms']:9.4f} {d['tbps']:9.2f} TB/s {base:>16} {ratio:>7} "
              f"{d['ratio_copy']:6.2f} {d['graph_ms']:9.4f}")
        if d.get("sweep"):
            best = d["sweep"][0]
            print(f"  best swept: {best['tuning']} {best['ms']:.4f} ms {best['tbps']:.2f} TB/s"
                  f" (graph {best['graph_ms']:.4f} ms)")
            best = d.get("best_graph", best)
            print(f"  best swept in a graph: {best['tuning']} {best['graph_ms']:.4f} ms "
                  f"{d['kv_bytes'] / best['graph_ms'] / 1e9:.2f} TB/s")
        if d.get("read_floor"):
            f = d["read_floor"]
            print(f"  reading the same bytes: {f['best_graph']['graph_ms']:.4f} ms in a graph "
                  f"({f['graph_tbps']:.2f} TB/s); empty launch {f['empty_kernel_graph_ms']:.4f}"
                  f" ms; default / read floor {d['ratio_read_floor_graph']:.2f}")
    for p in r["prefill"]:
        base = f"{p['sdpa_tflops']:.0f} TF SDPA" if "sdpa_tflops" in p else "-"
        ratio = f"{p['ratio_sdpa']:.2f}" if "ratio_sdpa" in p else "-"
        print(f"{p['case']:34} {p['ms']:9.4f} {p['tflops']:7.0f} TFLOP/s {base:>16} {ratio:>7}")
        if p.get("sweep"):
            best = p["sweep"][0]
            print(f"  best swept: {best['tuning']} {best['ms']:.4f} ms {best['tflops']:.0f} TF/s")
    for c in r["copies"]:
        print(f"{c['case']:34} {c['ms']:9.4f} {c['tbps']:9.2f} TB/s {'copy':>16} "
              f"{c['ratio_copy']:7.2f} {c['ratio_copy']:6.2f}")
    if r.get("checks_failed"):
        print("CHECKS FAILED:", r["checks_failed"])
    elif "checks" in r:
        worst = max(c["rel_err"] / c["tol"] for c in r["checks"].values())
        print(f"checks: all {len(r['checks'])} passed (worst rel err / tolerance {worst:.2f})")


if __name__ == "__main__":
    main()
