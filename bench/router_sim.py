"""Sweep the cluster simulator over policies and replay speeds; write JSON and a plot.

    python -m pdserve.bench.router_sim [--trace T] [--out bench/results/router_sim]

Runs every policy at the replay speed ``--low-scale`` (chosen so that
``offered_load`` lies in 0.6-0.9) and at each speed of ``--scales`` (1x up to
past ``offered_load`` 2), then checks the claims of issue 9:

* at the low load: pdserve's prefix hit rate >= 0.9 x pooled_hit_rate, and its
  TTFT p90 <= 1/3 of round_robin's;
* at every speed: pdserve's TTFT p90 <= 1.05 x the best of the other policies.

Writes ``<out>.json`` (every run plus the checks) and ``<out>.png`` (TTFT over
time per policy at the low load; TTFT p90 against replay speed).
"""

import argparse
import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path

from pdserve.bench.simulator import POLICIES, PROFILE, Simulator, load_trace
from pdserve.router.cost_model import load_profile

TRACE = "/work/shared/traces/mooncake_synthetic_trace.jsonl"


def run(trace, cost, policy, scale, args):
    sim = Simulator(trace, cost, args.prefill, args.decode, policy, scale,
                    kv_tokens=args.kv_tokens)
    res = sim.run()
    series = sorted((j.req.arrival_s / scale, j.first_token_s - j.req.arrival_s / scale)
                    for j in sim.jobs)
    return res, series


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--profile", default=str(PROFILE))
    ap.add_argument("--prefill", type=int, default=4)
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--kv-tokens", type=int, default=800_000)
    ap.add_argument("--low-scale", type=float, default=0.6)
    ap.add_argument("--scales", default="1,1.25,1.5,1.75,2")
    ap.add_argument("--out", default="bench/results/router_sim")
    args = ap.parse_args(argv)
    cost = dataclasses.replace(load_profile(args.profile), block_size=512)
    trace = load_trace(args.trace, 512)
    t0 = time.time()
    runs, low_series = [], {}
    for scale in [args.low_scale] + [float(s) for s in args.scales.split(",")]:
        for policy in POLICIES:
            res, series = run(trace, cost, policy, scale, args)
            runs.append(res)
            if scale == args.low_scale:
                low_series[policy] = series
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in res.items()}), flush=True)
    by = {(r["policy"], r["time_scale"]): r for r in runs}
    low = {p: by[p, args.low_scale] for p in POLICIES}
    checks = {
        "low_scale_offered_load": low["pdserve"]["offered_load"],
        "low_hit_vs_pooled": low["pdserve"]["prefix_hit_rate"] / low["pdserve"]["pooled_hit_rate"],
        "low_ttft_p90_vs_round_robin": low["pdserve"]["ttft_p90"] / low["round_robin"]["ttft_p90"],
        "ttft_p90_vs_best_other": {},
    }
    for scale in sorted({r["time_scale"] for r in runs}):
        best = min(by[p, scale]["ttft_p90"] for p in POLICIES if p != "pdserve")
        checks["ttft_p90_vs_best_other"][str(scale)] = by["pdserve", scale]["ttft_p90"] / best
    checks["pass"] = (0.6 <= checks["low_scale_offered_load"] <= 0.9
                      and checks["low_hit_vs_pooled"] >= 0.9
                      and checks["low_ttft_p90_vs_round_robin"] <= 1 / 3
                      and all(v <= 1.05 for v in checks["ttft_p90_vs_best_other"].values()))
    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    out = {"command": "python -m pdserve.bench.router_sim", "git_revision": rev.strip(),
           "machine": f"{platform.machine()} (pure Python simulation)",
           "trace": args.trace, "profile": args.profile, "num_prefill": args.prefill,
           "num_decode": args.decode, "kv_tokens_per_worker": args.kv_tokens,
           "cost_model": {k: v for k, v in dataclasses.asdict(cost).items()
                          if k != "pair_bandwidth_bytes_s"},
           "seconds": round(time.time() - t0, 1), "checks": checks, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    plot(low_series, runs, args, args.out + ".png")
    print(json.dumps(checks, indent=2))
    return 0


def plot(low_series, runs, args, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    for policy, series in low_series.items():
        window = 100
        xs, ys = [], []
        for i in range(window, len(series) + 1, 20):
            chunk = sorted(t for _, t in series[i - window:i])
            xs.append(series[i - 1][0])
            ys.append(chunk[int(0.9 * (len(chunk) - 1))])
        a.plot(xs, ys, label=policy)
    a.set_yscale("log")
    a.set_xlabel("arrival time (s)")
    a.set_ylabel("TTFT p90 over the last 100 requests (s)")
    a.set_title(f"Mooncake trace, {args.prefill}P+{args.decode}D, replay x{args.low_scale}")
    a.legend()
    for policy in POLICIES:
        rs = sorted((r["offered_load"], r["ttft_p90"]) for r in runs if r["policy"] == policy)
        b.plot([x for x, _ in rs], [y for _, y in rs], marker="o", label=policy)
    b.set_yscale("log")
    b.set_xlabel("offered load (prefill pool, no cache hits)")
    b.set_ylabel("TTFT p90 (s)")
    b.set_title("TTFT p90 against load")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
