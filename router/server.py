"""The router process: HTTP API (uvicorn on uvloop) + control server + token plane,
and the workers it launches, in one asyncio loop."""

import asyncio
import contextlib
import signal
import sys
import time

import uvicorn

from pdserve.engine.block_hash import HASH_ALGORITHM
from pdserve.engine.config import EngineConfig
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.engine.weights import resolve_model_dir
from pdserve.router.api import create_app
from pdserve.router.config import ServeConfig
from pdserve.router.control_server import ControlServicer, start_control_server
from pdserve.router.launcher import start_workers, stop_workers
from pdserve.router.placement import Placer
from pdserve.router.registry import Expectation, Registry
from pdserve.router.zmq_dispatcher import ZmqDispatcher


def _context_len(model_dir, engine: dict) -> int:
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(model_dir))
    limit = hf.max_position_embeddings
    return min(engine.get("max_model_len") or limit, limit)


async def serve(cfg: ServeConfig, port: int | None = None, out=None) -> int:
    """Run until SIGINT/SIGTERM. Returns the exit code."""
    out = out or sys.stdout
    model_dir = resolve_model_dir(cfg.model)  # converts a GGUF once, before workers start
    tokenizer = load_tokenizer(model_dir)
    defaults = EngineConfig()
    registry = Registry(Expectation(
        model=cfg.model, block_size=cfg.engine.get("block_size", defaults.block_size),
        hash_seed=cfg.engine.get("hash_seed", defaults.hash_seed),
        hash_algorithm=HASH_ALGORITHM), cfg.router.heartbeat_timeout_s,
        cfg.router.loop_stall_s)
    placer = Placer(registry, cfg.cluster_token, cfg.mode, slo=cfg.router.slo)
    dispatcher = ZmqDispatcher(cfg.model, tokenizer, _context_len(model_dir, cfg.engine),
                               registry, cfg.cluster_token, cfg.mode, cfg.router.host,
                               placer=placer)
    await dispatcher.start()
    servicer = ControlServicer(registry, cfg.cluster_token, dispatcher.token_address)
    grpc_server, control_address = await start_control_server(
        servicer, cfg.router.host, cfg.router.control_port)
    app = create_app(dispatcher, list(cfg.router.api_keys) or None,
                     cfg.router.request_timeout_s)
    app.state.registry = registry
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.router.host,
                                           port=cfg.router.port if port is None else port,
                                           loop="none", log_level="warning", access_log=False))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"pdserve: control plane at {control_address}", file=out, flush=True)
    procs = start_workers(cfg, control_address, out)
    code = 0
    try:
        t0 = time.monotonic()
        while len(registry.workers) < len(cfg.workers) and not stop.is_set():
            dead = [p.name for p in procs if p.proc.poll() is not None]
            if dead:
                print(f"pdserve: worker {', '.join(dead)} exited during start-up", file=out,
                      flush=True)
                return 1
            await asyncio.sleep(0.2)
            if int(time.monotonic() - t0) % 10 == 0 and time.monotonic() - t0 > 1:
                print(f"pdserve: waiting for workers ({len(registry.workers)}/"
                      f"{len(cfg.workers)} registered)", file=out, flush=True)
                await asyncio.sleep(1.0)
        if stop.is_set():
            return 0
        server.install_signal_handlers = lambda: None  # ours are in place
        serve_task = asyncio.create_task(server.serve())
        while not server.started and not serve_task.done():
            await asyncio.sleep(0.05)
        if serve_task.done():
            print(f"pdserve: the HTTP server could not start: {serve_task.exception()}",
                  file=out, flush=True)
            return 1
        host, bound = server.servers[0].sockets[0].getsockname()[:2]
        print(f"pdserve: serving {cfg.model} ({cfg.mode}, {cfg.transport}) at "
              f"http://{host}:{bound}/v1", file=out, flush=True)
        watch_exit = asyncio.create_task(_watch_workers(procs, stop, out))
        await stop.wait()
        watch_exit.cancel()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serve_task, 10)
    finally:
        stop_workers(procs)
        await grpc_server.stop(1)
        await dispatcher.close()
        print("pdserve: stopped", file=out, flush=True)
    return code


async def _watch_workers(procs, stop: asyncio.Event, out) -> None:
    reported = set()
    while not stop.is_set():
        await asyncio.sleep(1.0)
        for p in procs:
            if p.proc.poll() is not None and p.name not in reported:
                reported.add(p.name)
                print(f"pdserve: worker {p.name} exited with code {p.proc.returncode}",
                      file=out, flush=True)
