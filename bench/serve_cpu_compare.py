"""Disaggregated against colocated serving on this CPU box, same workloads, same rates.

    python -m pdserve.bench.serve_cpu_compare [--num-requests 24] [--rates 0.5,1.5]

Starts ``pdserve serve configs/local.yaml`` (one prefill + one decode worker, KV over
tcp), replays every workload at every Poisson rate, stops it (SIGTERM), then does the
same with ``configs/local-colocated.yaml`` (two workers that each prefill and decode).
Every request is also kept as one compact row, so other SLOs can be applied later.
Workloads: a shared-prefix mix (4 system prefixes of 192 tokens, suffixes of 16-64,
outputs of 8-24 tokens) and a random sample of the Azure conversation trace with its
lengths scaled by 0.2 and capped at 300 input / 32 output tokens. Writes
bench/results/serve_cpu_compare.json and .png, with the disaggregated / colocated
ratios of throughput and goodput for every (workload, rate).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pdserve.bench import loadgen
from pdserve.bench.client import Target
from pdserve.bench.common import write_result
from pdserve.bench.metrics_report import plot_grid

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = (("disaggregated", "configs/local.yaml"), ("colocated", "configs/local-colocated.yaml"))
WORKLOADS = {
    "shared-prefix": ["--workload", "shared-prefix", "--num-groups", "4", "--prefix-len", "192",
                      "--suffix-len", "uniform:16:64", "--output-len", "uniform:8:24"],
    "azure-conv": ["--workload", "azure-conv", "--sample", "random", "--length-scale", "0.2",
                   "--max-input", "300", "--max-output", "32"],
}
NOTE = ("Measured on a shared 2-core CPU box while other engineers' jobs (tests, other "
        "servers) ran: absolute numbers are noisy; the two systems ran one after the other "
        "on the same workloads. loadavg is os.getloadavg() (1, 5, 15 min).")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(config: str, port: int, timeout_s: float = 300.0) -> subprocess.Popen:
    """``pdserve serve CONFIG --port PORT``; returns once it prints 'pdserve: serving'."""
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.router.cli", "serve", config,
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ready = threading.Event()
    lines: list[str] = []

    def pump() -> None:  # keep draining stdout so the server never blocks on the pipe
        for line in iter(proc.stdout.readline, ""):
            lines.append(line)
            if "pdserve: serving" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_serve(proc)
            raise RuntimeError(f"{config} did not start:\n" + "".join(lines[-30:]))
    return proc


def stop_serve(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dirty_files() -> list[str]:
    """Tracked files changed in the working tree that the servers ran (others' work)."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    return sorted(line[3:] for line in out.splitlines() if line[3:].split("/")[0] != "bench")


def compact(result) -> list:
    """[ttft_ms, tpot_ms, e2e_ms, prompt tokens, output tokens, error] of one request."""
    def ms(x):
        return None if x is None else round(x * 1000, 1)

    return [ms(result.ttft_s), ms(result.tpot_s), ms(result.e2e_s), result.num_prompt_tokens,
            result.num_output_tokens, result.error and result.error[:120]]


def run_system(name: str, config: str, args, specs: dict, tokenizer) -> tuple[list, dict]:
    port = free_port()
    t0 = time.monotonic()
    proc = start_serve(config, port)
    info = {"config": config, "port": port, "startup_s": round(time.monotonic() - t0, 1),
            "loadavg_start": os.getloadavg()}
    print(f"{name}: serving on {port} after {info['startup_s']} s", flush=True)
    runs = []
    try:
        target = Target(f"http://127.0.0.1:{port}", "smollm2-135m", "completions",
                        timeout_s=args.request_timeout_s)
        for i, (workload, wl_specs) in enumerate(specs.items()):
            for run in loadgen.run_rates(target, wl_specs, args.rates, tokenizer, args.seed,
                                         (args.slo_ttft_ms, args.slo_tpot_ms),
                                         warmup=1 if i == 0 else 0, series=name,
                                         progress=not args.no_progress):
                run.update(workload=workload, loadavg_after=os.getloadavg())
                runs.append(run)
    finally:
        stop_serve(proc)
    info["loadavg_end"] = os.getloadavg()
    return runs, info


def describe(argv: list[str], specs: list) -> dict:
    n = len(specs)
    return {"argv": argv, "num_requests": n,
            "num_prompt_tokens_mean": round(sum(len(s.prompt_token_ids) for s in specs) / n, 1),
            "num_prompt_tokens_max": max(len(s.prompt_token_ids) for s in specs),
            "num_output_tokens_mean": round(sum(s.num_output_tokens for s in specs) / n, 1),
            "num_output_tokens_max": max(s.num_output_tokens for s in specs)}


def ratios(runs: list[dict]) -> list[dict]:
    """disaggregated / colocated for each (workload, rate). Pure."""
    by = {(r["series"], r["workload"], r["rate"]): r["summary"] for r in runs}
    out = []
    for (series, workload, rate), d in by.items():
        c = by.get(("colocated", workload, rate))
        if series != "disaggregated" or c is None:
            continue
        row = {"workload": workload, "rate": rate}
        for key in ("request_throughput", "output_token_throughput", "goodput",
                    "slo_attainment"):
            row[key] = round(d[key] / c[key], 3) if c[key] else None
        for key in ("ttft_ms", "tpot_ms"):
            dp, cp = (d[key] or {}).get("p50"), (c[key] or {}).get("p50")
            row[f"{key}_p50"] = round(dp / cp, 3) if dp and cp else None
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--rates", default="0.5,1.5")
    ap.add_argument("--slo-ttft-ms", type=float, default=5000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=1000.0)
    ap.add_argument("--request-timeout-s", type=float, default=120.0,
                    help="a request silent this long fails (bounds a run on a busy box)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on SIGTERM
    t_start = time.monotonic()
    parser = loadgen.build_parser()
    tokenizer = pool = None
    specs = {}
    for workload, argv in WORKLOADS.items():
        wl_args = parser.parse_args([*argv, "--num-requests", str(args.num_requests),
                                     "--seed", str(args.seed)])
        if pool is None:
            tokenizer, pool = loadgen.load_pool(wl_args)
        specs[workload] = loadgen.build_workload(wl_args, pool)
    runs, systems = [], {}
    for name, config in SYSTEMS:
        sys_runs, systems[name] = run_system(name, config, args, specs, tokenizer)
        runs += sys_runs
    for r in runs:
        r["label"] = f"{r['series']} {r['workload']} {r['rate']:g}/s"
    payload = {
        "note": NOTE,
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "wall_s": round(time.monotonic() - t_start, 1),
        "workloads": {w: describe(WORKLOADS[w], specs[w]) for w in specs},
        "rates": args.rates,
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
        "systems": systems,
        "working_tree_changes_served": dirty_files(),
        "request_columns": ["ttft_ms", "tpot_ms", "e2e_ms", "prompt_tokens", "output_tokens",
                            "error"],
        "ratios_disaggregated_over_colocated": ratios(runs),
        "runs": [{**loadgen.run_json(r, False), "workload": r["workload"],
                  "loadavg_after": r["loadavg_after"],
                  "requests": [compact(q) for q in r["requests"]]} for r in runs],
    }
    path = write_result("serve_cpu_compare", payload)
    print(f"wrote {path}")
    png = path.with_suffix(".png")
    plot_grid({w: [r for r in runs if r["workload"] == w] for w in specs}, png,
              f"disaggregated vs colocated, {os.cpu_count()}-core CPU box shared with other jobs",
              {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms})
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
