"""Starting and stopping worker processes for ``pdserve serve`` (the local launcher).

Each worker is ``python -m pdserve.<pool> SPEC_JSON`` (after the worker's
``launch_prefix``, e.g. ``ip netns exec NAME``); its output is relayed line by
line with a ``[name]`` prefix. ``stop`` sends SIGTERM, waits, then SIGKILLs.
"""

import dataclasses
import json
import os
import subprocess
import sys
import threading

from pdserve.router.config import ServeConfig, WorkerConfig

POOL_MODULE = {"prefill": "pdserve.prefill", "decode": "pdserve.decode",
               "colocated": "pdserve.decode"}


def worker_spec_json(cfg: ServeConfig, w: WorkerConfig, control_address: str) -> str:
    engine = cfg.worker_engine(w)
    extra = {}
    load_format = engine.pop("load_format", None)
    if load_format:
        extra["load_format"] = load_format
    if cfg.fault_injection:
        extra["fault_injection"] = True
    if cfg.kv_fault_rate:
        extra["kv_fault_rate"] = cfg.kv_fault_rate
        extra["kv_fault_seed"] = cfg.kv_fault_seed
    if extra:
        engine["extra"] = extra
    return json.dumps({"worker_id": w.name, "role": w.role, "control_address": control_address,
                       "token": cfg.cluster_token, "engine": engine, "host": w.host,
                       "transport": cfg.transport, "kv_lease_s": cfg.kv_lease_s,
                       "transfer_timeout_s": cfg.kv_transfer_timeout_s,
                       "kv_port": w.kv_port, "kv_advertise": w.kv_advertise})


@dataclasses.dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen
    relay: threading.Thread


def _relay(name: str, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[{name}] {line}")
        out.flush()
    stream.close()


def cpu_threads_per_worker(cfg: ServeConfig, num_cpus: int) -> dict[str, int]:
    """Threads for each CPU worker started on this machine: the cores shared evenly.

    Several engines on one box each taking every core oversubscribe it (OpenMP
    threads spin on cores the other engine needs: a 2-core box served a
    disaggregated request 10x slower). Workers with a launch prefix (another
    host) and GPU workers are left out. Pure.
    """
    local = [w.name for w in cfg.workers if not w.launch_prefix
             and str(cfg.worker_engine(w).get("device", "cpu")).startswith("cpu")]
    return {name: max(1, num_cpus // len(local)) for name in local}


def start_workers(cfg: ServeConfig, control_address: str, out=None) -> list[WorkerProcess]:
    """Spawn every worker of the config. Mutates nothing else."""
    out = out or sys.stdout
    procs = []
    threads = cpu_threads_per_worker(cfg, os.cpu_count() or 1)
    for w in cfg.workers:
        env = {**os.environ, **w.env, "PYTHONUNBUFFERED": "1"}
        if threads.get(w.name) and "OMP_NUM_THREADS" not in {**os.environ, **w.env}:
            env["OMP_NUM_THREADS"] = str(threads[w.name])
        proc = subprocess.Popen(
            [*w.launch_prefix, sys.executable, "-m", POOL_MODULE[w.role],
             worker_spec_json(cfg, w, control_address)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True)
        relay = threading.Thread(target=_relay, args=(w.name, proc.stdout, out), daemon=True)
        relay.start()
        procs.append(WorkerProcess(w.name, proc, relay))
    return procs


def stop_workers(procs: list[WorkerProcess], timeout_s: float = 10.0) -> None:
    """SIGTERM every worker, wait up to ``timeout_s``, SIGKILL the rest."""
    for p in procs:
        if p.proc.poll() is None:
            p.proc.terminate()
    for p in procs:
        try:
            p.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
        p.relay.join(timeout=2)
