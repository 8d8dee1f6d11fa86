"""The ``pdserve`` command line.

    pdserve serve CONFIG [--port N]        start the router and every worker of CONFIG
    pdserve status [--json] [--port N]     ask the router at that port about its workers
    pdserve bench ...                      replay a workload against the HTTP API
    pdserve sim TRACE [--policy P] [--json]  replay a trace through the selector, simulated
"""

import argparse
import json
import sys

STATUS_COLUMNS = ("name", "role", "healthy", "running", "waiting", "free_blocks",
                  "total_blocks", "kv_bytes_sent", "kv_bytes_received")


def _serve(args) -> int:
    import asyncio

    from pdserve.router.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"pdserve: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    from pdserve.router.server import serve

    return runner(serve(cfg, args.port))


def _status(args) -> int:
    import httpx

    url = f"http://{args.host}:{args.port}/status"
    try:
        reply = httpx.get(url, timeout=5.0)
        reply.raise_for_status()
    except httpx.HTTPError as exc:
        print(f"pdserve: cannot reach the router at {url}: {exc}", file=sys.stderr)
        return 1
    data = reply.json()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = data.get("workers", [])
    print(f"model {data.get('model')}  mode {data.get('mode')}  routing {data.get('routing')}")
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in STATUS_COLUMNS]
    print("  ".join(c.ljust(w) for c, w in zip(STATUS_COLUMNS, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w)
                        for c, w in zip(STATUS_COLUMNS, widths, strict=True)))
    return 0


def _bench(args, rest: list[str]) -> int:
    from pdserve.bench.loadgen import main as bench_main

    return bench_main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="pdserve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the router and the workers of a config")
    s.add_argument("config")
    s.add_argument("--port", type=int, default=None, help="HTTP port (overrides the config)")
    st = sub.add_parser("status", help="show the workers of a running router")
    st.add_argument("--json", action="store_true")
    st.add_argument("--port", type=int, default=8000)
    st.add_argument("--host", default="127.0.0.1")
    sub.add_parser("bench", help="load generator (see pdserve bench --help)", add_help=False)
    sub.add_parser("sim", help="cluster simulator (see pdserve sim --help)", add_help=False)
    if argv and argv[0] == "bench":
        return _bench(None, argv[1:])
    if argv and argv[0] == "sim":
        from pdserve.bench.simulator import main as sim_main

        return sim_main(argv[1:])
    args = ap.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _status(args)


if __name__ == "__main__":
    sys.exit(main())
