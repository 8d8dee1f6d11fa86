"""Process entry for a worker: ``python -m pdserve.<pool> SPEC_JSON``.

The launcher passes the worker's ``WorkerSpec`` as one JSON argument (never a
pickle). SIGTERM/SIGINT stop the loop; the process exits 0.
"""

import json
import logging
import signal
import sys

from pdserve.engine.config import EngineConfig
from pdserve.engine.worker_runtime import WorkerSpec


def spec_from_json(text: str) -> WorkerSpec:
    raw = json.loads(text)
    raw["engine"] = EngineConfig(**raw["engine"])
    return WorkerSpec(**raw)


GIL_SWITCH_INTERVAL_S = 0.001


def run_worker(worker_cls, argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    spec = spec_from_json(argv[0])
    # The loop thread shares the GIL with the fabric's threads (KV receiver, layer push,
    # NIXL progress, heartbeat): a waiting thread gets it within 1 ms, not the default 5.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    worker = worker_cls(spec)

    def _stop(signum, frame):
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"{spec.role} worker {spec.worker_id} ready (pid {__import__('os').getpid()}, "
          f"{worker.engine.pool.num_blocks} KV blocks)", flush=True)
    try:
        worker.run()
    except RuntimeError as exc:  # e.g. the router refused the registration
        print(f"{spec.role} worker {spec.worker_id}: {exc}", flush=True)
        sys.exit(2)
    print(f"{spec.role} worker {spec.worker_id} stopped", flush=True)
