"""Batch-1 paged decode attention as a decode step runs it: one launch per layer,
back to back, each layer reading its own KV. Written for the H200.

    PYTHONPATH=<dir holding pdserve> python3 bench/decode_chain_h200.py [--lens 1024 4096] [--sweep]

``kernels_h200.py`` times one decode launch alone (a CUDA graph of one kernel, L2
flushed): at batch 1 x 4096 tokens (16.8 MB) that is mostly the launch, the first
round trip and the tail (an empty kernel there takes ~4.6 us of the ~17). In a step
the 32 layers' launches follow each other (PDL overlaps one's prologue with the tail
of the one before), so this script measures the kernel's throughput in that setting:
for each context length, ``LAYERS`` paged caches (blocks in random order), one query
per layer, captured as ``LAYERS`` launches in one CUDA graph and timed with
``triton.testing.do_bench`` (L2 flushed before each replay; the chain reads
``LAYERS`` times the KV, far more than L2 holds). Per layer = graph / ``LAYERS``.
Block tables are ``--table-tokens`` wide (default 8192, an engine's
``max_model_len``), whatever the context; ``--sweep`` also times other launches
(``sweep_tunings``: fixed partitions, and partitions that follow the context).

In the same run, each the same way (``LAYERS`` launches on ``LAYERS`` buffers):
- SDPA (best of the grouped-rows and ``enable_gqa`` forms) on the same KV laid out
  contiguously ``[1, Hkv, L, D]``;
- the read floor: the fastest kernel that only reads the same bytes (``read_floor``);
- and the single launch in a graph, as ``kernels_h200`` reports it; and the HBM
  device-to-device copy bandwidth.
Checks: every layer's output against SDPA's (relative error within bf16 bounds).
Writes ``decode_chain_h200.json`` to $OUT (if set) or bench/results.
"""

import argparse
import datetime
import json
import os

import torch
import torch.nn.functional as F

from pdserve.bench.kernels_h200 import (
    BS,
    DEV,
    HKV,
    HQ,
    D,
    contiguous_kv,
    copy_bandwidth,
    git_rev,
    ms,
    paged,
    rel_err,
)
from pdserve.bench.read_floor import _graph_of as graph_of
from pdserve.bench.read_floor import _read_kernel, read_floor
from pdserve.kernels.triton_decode import (
    DecodeTuning,
    DecodeWorkspace,
    default_tuning,
    paged_decode_attention,
)

LAYERS = 32


def engine_tables(length: int, width_tokens: int) -> tuple:
    """``paged([length])`` with its block table widened to ``width_tokens`` (an engine
    sizes every table for ``max_model_len``; entries past the context name any block)."""
    k, v, tables = paged([length], torch.bfloat16)
    width = max(tables.shape[1], -(-width_tokens // BS))
    pad = torch.randint(0, k.shape[0], (1, width - tables.shape[1]), dtype=torch.int32,
                        device=DEV)
    return k, v, torch.cat([tables, pad], dim=1)


def time_ours(length: int, qs: list, ctx: torch.Tensor, scale: float, width_tokens: int,
              tunings: list) -> dict:
    """Our decode over ``LAYERS`` fresh paged caches: per-layer time in the chain for the
    default launch and each of ``tunings``, the default's single launch, each layer's
    output and its KV laid out contiguously (for SDPA)."""
    layers = [engine_tables(length, width_tokens) for _ in range(LAYERS)]
    outs = [torch.full_like(q, float("nan")) for q in qs]
    width = layers[0][2].shape[1]
    ws = DecodeWorkspace.allocate(1, HQ, HKV, D, -(-width * BS // 64), DEV)
    default = default_tuning(1, HKV, width, BS, qs[0].device)

    def chain(tuning):
        def run():
            for (k, v, t), q, o in zip(layers, qs, outs, strict=True):
                paged_decode_attention(q, k, v, t, ctx, scale, out=o, workspace=ws,
                                       tuning=tuning)
        return run

    swept = [{"tuning": str(t), "chain_ms": ms(graph_of(chain(t)).replay, rep=40) / LAYERS}
             for t in tunings]
    chain_ms = ms(graph_of(chain(default)).replay) / LAYERS
    k0, v0, t0 = layers[0]
    single_ms = ms(graph_of(lambda: paged_decode_attention(
        qs[0], k0, v0, t0, ctx, scale, out=outs[0], workspace=ws)).replay)
    chain(default)()
    contig = [(contiguous_kv(k, t[:, :-(-length // BS)], length),
               contiguous_kv(v, t[:, :-(-length // BS)], length)) for k, v, t in layers]
    return {"chain_ms": chain_ms, "single_ms": single_ms, "outs": outs, "contig": contig,
            "tuning": default, "swept": sorted(swept, key=lambda r: r["chain_ms"]),
            "table_tokens": width * BS}


def sweep_tunings() -> list:
    """Partitions that follow the context around the one launch that reached 1.5 TB/s
    at 4096 tokens in the d55a15f sweep (2 warps, at most 16 partitions of at least 128
    tokens): 2 warps with at most 16 / 32 partitions of at least 64 / 128 tokens, 32- or
    64-token steps, 2-4 stages; 4 warps with 32- and 128-token steps; 8 warps with
    128."""
    two = [DecodeTuning(2048, bn, num_warps=2, num_stages=st, max_partitions=mp,
                        min_partition=lo)
           for mp in (16, 32) for lo in (64, 128) for bn in (32, 64) for st in (2, 3, 4)]
    return two + [DecodeTuning(2048, bn, num_warps=w, max_partitions=16)
                  for bn, w in ((32, 4), (128, 4), (128, 8))]


def time_sdpa(contig: list, qs: list, scale: float) -> dict:
    """SDPA over the same KV, contiguous, ``LAYERS`` launches: ms per layer by form."""
    def run(gqa: bool):
        def chain():
            for (kc, vc), q in zip(contig, qs, strict=True):
                if gqa:
                    F.scaled_dot_product_attention(q.view(1, HQ, 1, D), kc, vc, scale=scale,
                                                   enable_gqa=True)
                else:
                    F.scaled_dot_product_attention(q.view(1, HKV, HQ // HKV, D), kc, vc,
                                                   scale=scale)
        return chain

    return {"grouped_rows_ms": ms(graph_of(run(False)).replay) / LAYERS,
            "enable_gqa_ms": ms(graph_of(run(True)).replay) / LAYERS}


def time_reads(kv_bytes: int, kernel: dict) -> float:
    """The read kernel of shape ``kernel`` over ``LAYERS`` buffers of ``kv_bytes``: ms
    per buffer in the chain."""
    words = kv_bytes // 4
    bufs = [torch.randint(-1000, 1000, (words,), dtype=torch.int32, device=DEV)
            for _ in range(LAYERS)]
    sink = torch.empty(1024, dtype=torch.int32, device=DEV)

    def reads():
        for b in bufs:
            _read_kernel[(kernel["grid"],)](b, sink, words // kernel["grid"],
                                            BLOCK=kernel["block"], num_warps=kernel["warps"])

    return ms(graph_of(reads).replay) / LAYERS


def chain_case(length: int, copy_bw: float, width_tokens: int, tunings: list) -> dict:
    """One context length: our decode, SDPA and the read floor, ``LAYERS`` launches each."""
    scale = D ** -0.5
    qs = [torch.randn(1, HQ, D, device=DEV, dtype=torch.bfloat16) for _ in range(LAYERS)]
    ctx = torch.tensor([length], dtype=torch.int32, device=DEV)
    kv_bytes = length * HKV * D * 2 * 2  # per layer
    ours = time_ours(length, qs, ctx, scale, width_tokens, tunings)
    errs = []
    for (kc, vc), q, o in zip(ours["contig"], qs, ours["outs"], strict=True):
        ref = F.scaled_dot_product_attention(q.view(1, HKV, HQ // HKV, D), kc, vc, scale=scale)
        errs.append(rel_err(o.float(), ref.reshape(1, HQ, D)))
    sdpa_detail = time_sdpa(ours.pop("contig"), qs, scale)
    sdpa_ms = min(sdpa_detail.values())
    floor_one = read_floor(kv_bytes)  # picks the read kernel's shape on one buffer
    best = floor_one["best_graph"]
    floor_ms = time_reads(kv_bytes, best)
    chain_ms, single_ms = ours["chain_ms"], ours["single_ms"]
    tbps = kv_bytes / chain_ms / 1e9
    return {
        "context": length, "kv_bytes_per_layer": kv_bytes, "layers": LAYERS,
        "tuning": str(ours["tuning"]), "table_tokens": ours["table_tokens"],
        "copy_tbps": copy_bw, "swept": ours["swept"],
        "chain_ms_per_layer": chain_ms, "chain_tbps": tbps, "chain_ratio_copy": tbps / copy_bw,
        "sdpa_chain_ms_per_layer": sdpa_ms, "sdpa_chain_tbps": kv_bytes / sdpa_ms / 1e9,
        "sdpa_detail": sdpa_detail, "ratio_sdpa": sdpa_ms / chain_ms,
        "read_floor_chain_ms_per_layer": floor_ms,
        "read_floor_chain_tbps": kv_bytes / floor_ms / 1e9,
        "ratio_read_floor": floor_ms / chain_ms, "read_floor_kernel": best,
        "single_launch_graph_ms": single_ms, "single_launch_tbps": kv_bytes / single_ms / 1e9,
        "read_floor_single_graph_ms": best["graph_ms"],
        "empty_kernel_graph_ms": floor_one["empty_kernel_graph_ms"],
        "max_rel_err_vs_sdpa": max(errs), "checks_pass": max(errs) < 2e-2,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--table-tokens", type=int, default=8192,
                    help="block-table width in tokens, as an engine's max_model_len")
    ap.add_argument("--sweep", action="store_true", help="also time sweep_tunings()")
    ap.add_argument("--rev", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    rows = []
    for length in args.lens:
        row = chain_case(length, copy_bw, args.table_tokens,
                         sweep_tunings() if args.sweep else [])
        rows.append(row)
        print(f"B=1 x {length}: {row['chain_ms_per_layer'] * 1e3:.2f} us/layer in a chain = "
              f"{row['chain_tbps']:.2f} TB/s ({row['chain_ratio_copy']:.2f}x copy "
              f"{copy_bw:.2f}); SDPA {row['sdpa_chain_tbps']:.2f} TB/s "
              f"({row['ratio_sdpa']:.2f}x ours); read floor {row['read_floor_chain_tbps']:.2f}"
              f" TB/s; single launch {row['single_launch_graph_ms'] * 1e3:.1f} us "
              f"({row['single_launch_tbps']:.2f} TB/s); err {row['max_rel_err_vs_sdpa']:.1e}",
              flush=True)
        for r in row["swept"][:4]:
            print(f"   {r['chain_ms'] * 1e3:.2f} us {r['tuning']}", flush=True)
    result = {
        "command": "python3 bench/decode_chain_h200.py " + " ".join(
            ["--lens", *map(str, args.lens), "--table-tokens", str(args.table_tokens)]
            + (["--sweep"] if args.sweep else [])),
        "git_revision": git_rev(args.rev), "gpu": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_TB_s": copy_bw, "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D,
                                                  "block_size": BS, "dtype": "bfloat16"},
        "cases": rows, "all_checks_pass": all(r["checks_pass"] for r in rows),
    }
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    path = os.path.join(out_dir, "decode_chain_h200.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
