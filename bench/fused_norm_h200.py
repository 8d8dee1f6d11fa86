"""The decode layer's GEMVs with the RMSNorms folded in, against the unfused layer, on
the H200 (Llama-3-8B shapes, bf16, batch 1 and 8).

    PYTHONPATH=<dir holding pdserve> python3 bench/fused_norm_h200.py

Per layer the unfused chain is what ``DecoderLayer.forward`` runs on CUDA, less RoPE
and attention (the same in every variant): residual add + RMSNorm, QKV GEMV, o_proj
GEMV, residual add + RMSNorm, gate/up GEMV with SiLU * up, down GEMV. The variants:

- ``add_only``: the residual adds in the o_proj / down epilogues, the norms still
  their own kernels (the same kernel count: what the epilogue add costs);
- ``exact``: ``norm_weight``, the norm applied to each x tile in the K loop, rounded as
  the RMSNorm kernel rounds (four kernels a layer);
- ``scale_rows``: x fed to the dot as it is (the norm weight folded into W), each
  output column scaled by 1 / rms of its row in the epilogue, the rows' squares read
  after the K loop (``rms_scale=2``);
- ``scale_loop``: the same with the squares summed from the x tiles in the K loop
  (``rms_scale=3``).

Each is ``LAYERS`` layers on their own weights, captured in one CUDA graph and timed
with ``triton.testing.do_bench``; per layer = graph / ``LAYERS``. The floor is the
layer's weight bytes at the device-to-device copy rate measured in the same run.
Check: one layer of each variant against the unfused layer on the same input
(relative error of the residual stream after the layer). Writes
``fused_norm_h200.json`` to $OUT (if set) or bench/results.
"""

import torch
from triton.testing import do_bench

from pdserve.bench.common import write_result
from pdserve.bench.engine_h200 import copy_bandwidth
from pdserve.kernels.triton_fused import rms_norm
from pdserve.kernels.triton_gemv import gemv, gemv_glu

LAYERS = 32
H, QKV, FFN = 4096, 6144, 14336
EPS = 1e-5
VARIANTS = ("unfused", "add_only", "exact", "scale_rows", "scale_loop")


def make_layers(n: int) -> list[dict]:
    """``n`` layers of random bf16 weights (std 0.02) and norm weights of one (so the
    folded and unfolded variants share the weights)."""
    def w(rows, cols):
        return (torch.randn(rows, cols, device="cuda") * 0.02).to(torch.bfloat16)

    ones = torch.ones(H, device="cuda", dtype=torch.bfloat16)
    return [{"qkv": w(QKV, H), "o": w(H, H), "gu": w(2 * FFN, H), "down": w(H, FFN),
             "g1": ones, "g2": ones} for _ in range(n)]


def layer(variant: str, p: dict, x: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """One layer; ``stream`` (mutated) is the residual stream, ``x`` the previous
    layer's MLP output for the unfused variant (added into the stream first). Returns
    the next ``x`` (unfused) or ``stream``."""
    if variant == "unfused":
        h = rms_norm(x, p["g1"], EPS, stream)
        o = gemv(gemv(h, p["qkv"])[:, :H], p["o"])
        h2 = rms_norm(o, p["g2"], EPS, stream)
        return gemv(gemv_glu(h2, p["gu"]), p["down"])
    if variant == "add_only":
        a = gemv(rms_norm(stream, p["g1"], EPS), p["qkv"])[:, :H]
        gemv(a, p["o"], out=stream, accumulate=True)
        gemv(gemv_glu(rms_norm(stream, p["g2"], EPS), p["gu"]), p["down"], out=stream,
             accumulate=True)
        return stream
    if variant == "exact":
        kw1, kw2 = {"norm_weight": p["g1"], "eps": EPS}, {"norm_weight": p["g2"], "eps": EPS}
    else:
        mode = 2 if variant == "scale_rows" else 3
        kw1 = kw2 = {"rms_scale": mode, "eps": EPS}
    a = gemv(stream, p["qkv"], **kw1)[:, :H]
    gemv(a, p["o"], out=stream, accumulate=True)
    gemv(gemv_glu(stream, p["gu"], **kw2), p["down"], out=stream, accumulate=True)
    return stream


def chain(variant: str, layers: list[dict], x0: torch.Tensor, s0: torch.Tensor):
    """The ``LAYERS``-layer chain on copies of (x0, s0); returns (fn, final stream)."""
    x, stream = x0.clone(), s0.clone()

    def fn():
        y = x
        for p in layers:
            y = layer(variant, p, y, stream)
        return y
    return fn, stream


def graph_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=10, rep=100, return_mode="median")


def one_layer_error(variant: str, p: dict, m: int) -> float:
    """Relative error of the stream after one layer against the unfused layer (which
    adds x into the stream first: here x = 0 for it, the stream already summed)."""
    s = torch.randn(m, H, device="cuda").to(torch.bfloat16)
    ref_s = s.clone()
    y = layer("unfused", p, torch.zeros_like(s), ref_s)
    ref = (ref_s.float() + y.float())
    got_s = s.clone()
    layer(variant, p, None, got_s)
    return ((got_s.float() - ref).norm() / ref.norm()).item()


def main() -> None:
    bw = copy_bandwidth()
    layers = make_layers(LAYERS)
    layer_bytes = sum(t.numel() * t.element_size() for k, t in layers[0].items()
                      if k in ("qkv", "o", "gu", "down"))
    floor_ms = layer_bytes / bw * 1e3
    print(f"copy {bw / 1e12:.3f} TB/s; layer weights {layer_bytes / 1e6:.1f} MB, "
          f"floor {floor_ms * 1e3:.2f} us/layer", flush=True)
    out = {"gpu": torch.cuda.get_device_name(0), "copy_bandwidth_TB_s": bw / 1e12,
           "layers": LAYERS, "layer_weight_bytes": layer_bytes,
           "floor_us_per_layer": floor_ms * 1e3, "batches": {}}
    for m in (1, 8):
        x0 = (torch.randn(m, H, device="cuda") * 0.1).to(torch.bfloat16)
        s0 = torch.randn(m, H, device="cuda").to(torch.bfloat16)
        rows = {}
        for v in VARIANTS:
            fn, _ = chain(v, layers, x0, s0)
            us = graph_ms(fn) / LAYERS * 1e3
            err = 0.0 if v == "unfused" else one_layer_error(v, layers[0], m)
            rows[v] = {"us_per_layer": us, "ratio_floor": us / (floor_ms * 1e3),
                       "one_layer_rel_err": err, "check": err < 2e-2}
            print(f"M={m} {v:11s} {us:8.2f} us/layer  {us / (floor_ms * 1e3):.3f}x floor  "
                  f"err {err:.2e}", flush=True)
        base = rows["unfused"]["us_per_layer"]
        for v in VARIANTS:
            rows[v]["ratio_unfused"] = rows[v]["us_per_layer"] / base
        out["batches"][str(m)] = rows
    out["all_checks_pass"] = all(r["check"] for b in out["batches"].values()
                                 for r in b.values())
    print("written", write_result("fused_norm_h200", out))


if __name__ == "__main__":
    main()
