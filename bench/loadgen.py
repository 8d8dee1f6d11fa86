"""``pdserve bench``: replay a workload against a running pdserve (or any OpenAI) server.

    pdserve bench --port 8000 --workload shared-prefix --num-requests 60 --rates 0.5,1,2 \\
        --num-groups 4 --prefix-len 192 --suffix-len uniform:16:64 --output-len 32 \\
        --slo-ttft-ms 2000 --slo-tpot-ms 200
    pdserve bench --workload azure-conv --num-requests 200 --length-scale 0.2 \\
        --max-input 300 --max-output 32 --speedup 4            # trace timestamps, 4x faster
    pdserve bench --workload mooncake --sample random --num-requests 100 --rate 2

Workloads: ``synthetic`` (``--input-len``/``--output-len`` distributions: ``N``,
``uniform:LO:HI``, ``normal:MEAN:STD``, ``exp:MEAN``), ``shared-prefix`` (``--num-groups``
prefixes of ``--prefix-len`` tokens, suffixes of ``--suffix-len``), and the traces
``azure-conv``, ``azure-code``, ``mooncake`` (or ``trace`` with ``--trace FILE``). Traces
replay their own timestamps unless ``--rate``/``--rates`` asks for Poisson arrivals;
synthetic workloads default to all-at-once (``--rate inf``). Prompts are token ids of the
served model's tokenizer (``--model``, default smollm2-135m), so their lengths are exact;
outputs are exactly ``max_tokens`` long (``ignore_eos``).

Writes ``<out-dir>/<result-name>.json`` (command, git revision, machine, date, arguments,
one summary per rate) and ``.png`` (TTFT/TPOT CDFs; SLO attainment and goodput against the
rate when several rates run). See ``metrics_report`` for the metric definitions.
"""

import argparse
import asyncio
import math
import os
import sys
from pathlib import Path

from pdserve.bench import traces, workloads
from pdserve.bench.client import Target, request_body, run_workload, served_model
from pdserve.bench.common import RESULTS, write_result
from pdserve.bench.metrics_report import plot_runs, summarize

TRACE_WORKLOADS = (*traces.NAMED_TRACES, "trace")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdserve bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("server")
    g.add_argument("--base-url", default=None, help="default http://HOST:PORT")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="completions sends token-id prompts (exact lengths)")
    g.add_argument("--model", default="smollm2-135m", help="model whose tokenizer builds prompts")
    g.add_argument("--tokenizer", default=None, help="a tokenizer directory (overrides --model)")
    g.add_argument("--served-model", default=None, help="model name to send (default: /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"))
    g.add_argument("--timeout-s", type=float, default=600.0)
    w = ap.add_argument_group("workload")
    w.add_argument("--workload", default="synthetic",
                   choices=("synthetic", "shared-prefix", *TRACE_WORKLOADS))
    w.add_argument("--trace", default=None, help="trace file for --workload trace")
    w.add_argument("--num-requests", type=int, default=100)
    w.add_argument("--input-len", default="256", help="synthetic prompt length distribution")
    w.add_argument("--output-len", default="64", help="output length distribution (synthetic, "
                   "shared-prefix)")
    w.add_argument("--num-groups", type=int, default=4)
    w.add_argument("--prefix-len", type=int, default=256)
    w.add_argument("--suffix-len", default="64")
    w.add_argument("--sample", choices=("first", "random"), default="first",
                   help="trace rows: a window from --skip, or a seeded random sample")
    w.add_argument("--skip", type=int, default=0)
    w.add_argument("--length-scale", type=float, default=1.0)
    w.add_argument("--max-input", type=int, default=None)
    w.add_argument("--max-output", type=int, default=None)
    w.add_argument("--seed", type=int, default=0)
    a = ap.add_argument_group("arrivals")
    a.add_argument("--rate", type=float, default=None, help="Poisson req/s; inf: all at once")
    a.add_argument("--rates", default=None, help="comma-separated Poisson rates, one run each")
    a.add_argument("--speedup", type=float, default=1.0, help="trace replay speed factor")
    a.add_argument("--max-concurrency", type=int, default=None)
    a.add_argument("--warmup", type=int, default=1, help="requests sent before measuring")
    o = ap.add_argument_group("metrics and output")
    o.add_argument("--slo-ttft-ms", type=float, default=None)
    o.add_argument("--slo-tpot-ms", type=float, default=None)
    o.add_argument("--result-name", default="loadgen")
    o.add_argument("--out-dir", default=None, help=f"default $OUT or {RESULTS}")
    o.add_argument("--save-requests", action="store_true", help="per-request timings in the JSON")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    return ap


def load_pool(args) -> tuple[object, workloads.TokenPool]:
    from pdserve.engine.tokenizer import load_tokenizer
    from pdserve.engine.weights import resolve_model_dir

    path = Path(args.tokenizer) if args.tokenizer else resolve_model_dir(args.model)
    tokenizer = load_tokenizer(path)
    return tokenizer, workloads.TokenPool.from_tokenizer(tokenizer)


def build_workload(args, pool: workloads.TokenPool) -> list[workloads.RequestSpec]:
    """The workload that ``args`` names, arrivals from the trace (or all at 0)."""
    n, seed = args.num_requests, args.seed
    dist = workloads.LengthDist.parse
    if args.workload == "synthetic":
        return workloads.synthetic(n, dist(args.input_len), dist(args.output_len), pool, seed)
    if args.workload == "shared-prefix":
        return workloads.shared_prefix(n, args.num_groups, args.prefix_len,
                                       dist(args.suffix_len), dist(args.output_len), pool, seed)
    path = args.trace if args.workload == "trace" else args.workload
    if path is None:
        raise SystemExit("pdserve bench: --workload trace needs --trace FILE")
    rows = traces.select_rows(traces.read_trace(path), n, args.sample, args.skip, seed)
    rows = traces.scale_rows(rows, args.length_scale, args.max_input, args.max_output)
    specs = workloads.from_trace(rows, pool, seed)
    return workloads.speed_up(specs, args.speedup) if args.speedup != 1.0 else specs


def arrival_plan(args) -> list[float | None]:
    """Poisson rates to run; None means 'keep the workload's own arrival times'."""
    if args.rates:
        return [float(r) for r in args.rates.split(",")]
    if args.rate is not None:
        return [args.rate]
    return [None] if args.workload in TRACE_WORKLOADS else [math.inf]


def run_rates(target: Target, specs: list[workloads.RequestSpec], rates: list[float | None],
              tokenizer=None, seed: int = 0, slo: tuple[float | None, float | None] = (None, None),
              max_concurrency: int | None = None, warmup: int = 1, progress: bool = True,
              series: str = "") -> list[dict]:
    """One open-loop run per rate; returns ``{series, rate, label, summary, requests}``."""
    bodies = [request_body(s, target, tokenizer) for s in specs]
    if warmup:
        warm = [workloads.RequestSpec(s.prompt_token_ids, min(s.num_output_tokens, 4))
                for s in specs[:warmup]]
        for s in warm:  # one at a time, not measured
            asyncio.run(run_workload(target, [s], [request_body(s, target, tokenizer)],
                                     progress=False))
    runs = []
    for rate in rates:
        plan = specs if rate is None else workloads.with_arrivals(
            specs, workloads.poisson_arrivals(len(specs), rate, seed))
        label = f"{series} " if series else ""
        label += "trace arrivals" if rate is None else f"rate {rate:g}/s"
        results, duration = asyncio.run(run_workload(target, plan, bodies, max_concurrency,
                                                     desc=label, progress=progress))
        summary = summarize(results, duration, *slo)
        print(format_summary(label, summary), flush=True)
        runs.append({"series": series, "rate": rate, "label": label, "summary": summary,
                     "requests": results})
    return runs


def format_summary(label: str, s: dict) -> str:
    def ms(key, p):
        return f"{s[key][p]:.0f}" if s[key] else "-"

    return (f"{label}: {s['num_ok']}/{s['num_requests']} ok in {s['duration_s']:.1f} s | "
            f"{s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} out tok/s"
            f" | TTFT p50/p99 {ms('ttft_ms', 'p50')}/{ms('ttft_ms', 'p99')} ms | TPOT p50/p99 "
            f"{ms('tpot_ms', 'p50')}/{ms('tpot_ms', 'p99')} ms | goodput "
            f"{s['goodput']:.2f} req/s ({100 * s['slo_attainment']:.0f}% in SLO)"
            + (f" | errors {s['errors']}" if s["errors"] else ""))


def _finite(value):
    """JSON has no Infinity: an infinite rate is written as the string "inf"."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def run_json(run: dict, with_requests: bool) -> dict:
    out = {k: _finite(run[k]) for k in ("series", "rate", "label", "summary")}
    if with_requests:
        out["requests"] = [r.to_json() for r in run["requests"]]
    return out


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    tokenizer, pool = load_pool(args)
    specs = build_workload(args, pool)
    if not specs:
        print("pdserve bench: the workload is empty", file=sys.stderr)
        return 2
    try:
        model = args.served_model or served_model(base_url, args.api_key)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the server ends here
        print(f"pdserve bench: cannot reach {base_url}: {exc}", file=sys.stderr)
        return 1
    target = Target(base_url, model, args.endpoint, args.api_key, args.timeout_s)
    runs = run_rates(target, specs, arrival_plan(args), tokenizer, args.seed,
                     (args.slo_ttft_ms, args.slo_tpot_ms), args.max_concurrency, args.warmup,
                     not args.no_progress)
    payload = {"target": {"base_url": base_url, "model": model, "endpoint": args.endpoint},
               "args": {k: _finite(v) for k, v in vars(args).items() if k != "api_key"},
               "loadavg": os.getloadavg(),
               "runs": [run_json(r, args.save_requests) for r in runs]}
    out_dir = Path(args.out_dir) if args.out_dir else None
    path = write_result(args.result_name, payload, out_dir)
    print(f"wrote {path}")
    if not args.no_plot:
        png = path.with_suffix(".png")
        plot_runs(runs, png, f"{args.workload} on {model}",
                  {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms})
        print(f"wrote {png}")
    return 0 if any(r["summary"]["num_ok"] for r in runs) else 1
