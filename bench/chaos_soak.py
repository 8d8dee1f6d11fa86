"""Chaos soak: a few hundred requests while workers are killed, restarted and stopped.

    python -m pdserve.bench.chaos_soak [--requests 300] [--concurrency 8] [--every 4]

Starts ``pdserve serve`` with one prefill and two decode workers (tcp, CPU), sends
``--requests`` greedy chat requests ``--concurrency`` at a time, and every ``--every``
seconds (jittered) does one of: SIGKILL a worker and start it again a few seconds later
(the new process registers under the same name), or SIGSTOP a worker for a few seconds
and SIGCONT it. At least one decode worker is left alone at any time. A monitor polls
the router's /status every 0.2 s.

Reports: success rate; error kinds (status and message); per action, the time the
router took to detect the dead or stopped peer (unhealthy in its registry), and the time
to recover (healthy again, from the restart or the SIGCONT, and from the fault); and
the four invariants once quiet: every block of every worker free (counted), no request
outlived its deadline, no worker died that the soak did not kill, every success gave
exactly single-process greedy tokens. Writes bench/results/chaos_soak.json.
"""

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from pdserve.bench.common import write_result

TOKEN = "chaos-soak-token"
THINGS = ["fruit", "city", "colour", "planet", "river", "animal", "metal", "tree"]
REQUEST_TIMEOUT_S = 60.0
HEARTBEAT_TIMEOUT_S = 3.0
MAX_TOKENS = 16


def prompt(i: int) -> list[dict]:
    """The i-th of ``len(THINGS)`` distinct prompts (request i sends prompt(i))."""
    k = i % len(THINGS)
    return [{"role": "user", "content": f"Question {k}: name a {THINGS[k]}."}]


def config(port: int) -> dict:
    return {"model": "smollm2-135m", "mode": "disaggregated", "transport": "tcp",
            "cluster_token": TOKEN, "kv_lease_s": 3.0, "kv_transfer_timeout_s": 15.0,
            "router": {"port": port, "request_timeout_s": REQUEST_TIMEOUT_S,
                       "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S, "loop_stall_s": 8.0},
            "engine": {"device": "cpu", "num_blocks": 384, "max_num_batched_tokens": 256},
            "workers": [{"name": "prefill0", "role": "prefill"},
                        {"name": "decode0", "role": "decode"},
                        {"name": "decode1", "role": "decode"}]}


@dataclass
class Cluster:
    """The ``pdserve serve`` process, its output, and the workers the soak restarted."""

    proc: subprocess.Popen
    url: str
    config_path: str
    lines: list[str] = field(default_factory=list)
    control_address: str = ""
    restarted: dict[str, subprocess.Popen] = field(default_factory=dict)

    def status(self) -> dict:
        return httpx.get(self.url + "/status", timeout=10).json()

    def workers(self) -> dict[str, dict]:
        return {w["name"]: w for w in self.status()["workers"]}


def _pump(stream, lines: list[str], prefix: str = "") -> None:
    for line in iter(stream.readline, ""):
        lines.append(prefix + line)


def start_cluster(tmp: Path, port: int) -> Cluster:
    path = tmp / "chaos.yaml"
    path.write_text(yaml.safe_dump(config(port)))
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.router.cli", "serve", str(path),
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    c = Cluster(proc, f"http://127.0.0.1:{port}", str(path))
    threading.Thread(target=_pump, args=(proc.stdout, c.lines), daemon=True).start()
    deadline = time.monotonic() + 300
    while not any("pdserve: serving" in ln for ln in c.lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("pdserve serve did not start:\n" + "".join(c.lines[-40:]))
        time.sleep(0.2)
    c.control_address = next(re.search(r"control plane at (\S+)", ln)[1]
                             for ln in c.lines if "control plane at" in ln)
    return c


def restart_worker(c: Cluster, name: str) -> None:
    """Start worker ``name`` again (as the launcher does); it registers under its name."""
    from pdserve.router.config import load_config
    from pdserve.router.launcher import POOL_MODULE, worker_spec_json

    cfg = load_config(c.config_path)
    w = next(w for w in cfg.workers if w.name == name)
    proc = subprocess.Popen(
        [sys.executable, "-m", POOL_MODULE[w.role], worker_spec_json(cfg, w, c.control_address)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    threading.Thread(target=_pump, args=(proc.stdout, c.lines, f"[{name}*] "),
                     daemon=True).start()
    old = c.restarted.pop(name, None)
    if old is not None:
        old.wait(timeout=10)
    c.restarted[name] = proc


class Monitor:
    """Polls /status; records when each worker turned unhealthy / healthy, and its pid."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.events: list[tuple[float, str, bool, int]] = []  # (t, name, healthy, pid)
        self._last: dict[str, tuple[bool, int]] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                rows = self.c.workers()
            except (httpx.HTTPError, ValueError):
                continue
            now = time.monotonic()
            for name, w in rows.items():
                state = (bool(w["healthy"]), int(w["pid"]))
                if self._last.get(name) != state:
                    self._last[name] = state
                    self.events.append((now, name, *state))

    def first(self, name: str, healthy: bool, after: float, pid_not: int | None = None):
        """Seconds after ``after`` until ``name`` was first seen (un)healthy, or None."""
        for t, n, h, pid in self.events:
            if n == name and h == healthy and t >= after and (pid_not is None or pid != pid_not):
                return round(t - after, 2)
        return None

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


@dataclass
class Action:
    kind: str  # "kill" | "stop"
    worker: str
    pid: int
    t_fault: float
    t_undo: float = 0.0  # restart launched / SIGCONT sent
    detect_s: float | None = None  # fault -> unhealthy in the router's registry
    recover_s: float | None = None  # undo -> healthy again (a new pid after a kill)
    outage_s: float | None = None  # fault -> healthy again


def chaos(c: Cluster, rng: random.Random, every_s: float, done: threading.Event,
          actions: list[Action]) -> None:
    """Until ``done``: a kill (with a restart) or a stop (with a continue) every few s."""
    while not done.wait(every_s * rng.uniform(0.6, 1.4)):
        try:
            rows = c.workers()
        except httpx.HTTPError:
            continue
        healthy = [n for n, w in rows.items() if w["healthy"]]
        decodes = [n for n in healthy if rows[n]["role"] == "decode"]
        pool = [n for n in healthy if rows[n]["role"] != "decode" or len(decodes) > 1]
        if not pool:
            continue
        name, kind = rng.choice(pool), rng.choice(["kill", "stop"])
        pid = rows[name]["pid"]
        a = Action(kind, name, pid, time.monotonic())
        actions.append(a)
        if kind == "kill":
            os.kill(pid, signal.SIGKILL)
            time.sleep(rng.uniform(2.0, 4.0))
            a.t_undo = time.monotonic()
            restart_worker(c, name)
        else:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(rng.uniform(HEARTBEAT_TIMEOUT_S + 1, HEARTBEAT_TIMEOUT_S + 4))
            os.kill(pid, signal.SIGCONT)
            a.t_undo = time.monotonic()


async def load(url: str, num: int, concurrency: int) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    out: list[dict] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        async with sem:
            t0 = time.monotonic()
            row = {"i": i, "start": t0}
            try:
                r = await client.post("/v1/chat/completions", json={
                    "model": "smollm2-135m", "temperature": 0, "max_tokens": MAX_TOKENS,
                    "messages": prompt(i)})
                row["status"] = r.status_code
                body = r.json()
                if r.status_code == 200:
                    row["text"] = body["choices"][0]["message"]["content"]
                else:
                    row["error"] = body.get("error", {}).get("message", r.text[:200])
            except (httpx.HTTPError, ValueError) as exc:
                row["status"], row["error"] = 0, f"{type(exc).__name__}: {exc}"
            row["seconds"] = time.monotonic() - t0
            out.append(row)

    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S + 30) as client:
        await asyncio.gather(*(one(client, i) for i in range(num)))
    return out


def error_kind(row: dict) -> str:
    """A short class for an error: status and the message without ids and numbers."""
    msg = re.sub(r"\b[0-9a-f]{32}\b", "<id>", row.get("error", ""))
    msg = re.sub(r"\d+(\.\d+)?", "N", msg)[:100]
    return f"{row['status']} {msg}"


def wait_quiet(c: Cluster, timeout_s: float = 90.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = c.workers()
        if all(w["healthy"] and w["free_blocks"] == w["total_blocks"] and w["running"] == 0
               and w["waiting"] == 0 and w["pending_transfers"] == 0 for w in rows.values()):
            return rows
        if time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def summarize(actions: list[Action], key: str) -> dict:
    """n, mean, min, max of one timing over ``actions`` (those that have it)."""
    vals = [v for a in actions if (v := getattr(a, key)) is not None]
    if not vals:
        return {"n": 0}
    return {"n": len(vals), "mean_s": round(sum(vals) / len(vals), 2), "max_s": max(vals),
            "min_s": min(vals)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--every", type=float, default=4.0, help="seconds between faults (mean)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8391)
    p.add_argument("--name", default="chaos_soak")
    args = p.parse_args(argv)

    from pdserve import LLM, SamplingParams

    ref = LLM("smollm2-135m", num_blocks=256)
    expected = {i: o.text for i, o in enumerate(ref.chat(
        [prompt(i) for i in range(len(THINGS))],
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False))}
    del ref

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        c = start_cluster(Path(tmp), args.port)
        try:
            return run(c, args, rng, expected)
        finally:
            for proc in c.restarted.values():
                proc.terminate()
            c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                c.proc.kill()
            for proc in c.restarted.values():
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def run(c: Cluster, args, rng: random.Random, expected: dict[int, str]) -> int:
    original = {n: w["pid"] for n, w in c.workers().items()}
    mon = Monitor(c)
    mon.thread.start()
    actions: list[Action] = []
    done = threading.Event()
    t_start = time.monotonic()
    chaos_thread = threading.Thread(target=chaos, args=(c, rng, args.every, done, actions),
                                    daemon=True)
    chaos_thread.start()
    rows = asyncio.run(load(c.url, args.requests, args.concurrency))
    done.set()
    chaos_thread.join(timeout=30)
    duration = time.monotonic() - t_start
    quiet = wait_quiet(c)
    mon.stop()

    for a in actions:  # detection and recovery, from the monitor's transitions
        a.detect_s = mon.first(a.worker, False, a.t_fault)
        if a.kind == "kill":
            a.recover_s = mon.first(a.worker, True, a.t_undo, pid_not=a.pid)
        else:
            a.recover_s = mon.first(a.worker, True, a.t_undo)
        a.outage_s = None if a.recover_s is None else round(
            a.t_undo - a.t_fault + a.recover_s, 2)

    ok = [r for r in rows if r["status"] == 200]
    wrong = [r for r in ok if r["text"] != expected[r["i"] % len(THINGS)]]
    late = [r for r in rows if r["seconds"] > REQUEST_TIMEOUT_S + 10]
    killed = {a.pid for a in actions if a.kind == "kill"}
    unexpected_deaths = [f"{n} (pid {pid})" for n, pid in original.items()
                         if pid not in killed and not _alive(pid)]
    unexpected_deaths += [f"{n} (restarted, pid {proc.pid})" for n, proc in c.restarted.items()
                          if proc.pid not in killed and proc.poll() is not None]
    leaks = {n: w for n, w in quiet.items()
             if not (w["free_blocks"] == w["total_blocks"] and w["running"] == 0
                     and w["waiting"] == 0 and w["pending_transfers"] == 0)}
    invariants = {
        "all_blocks_free": not leaks,
        "no_request_outlived_deadline": not late,
        "no_unexpected_worker_death": not unexpected_deaths,
        "every_success_exact": not wrong,
        "all_workers_healthy_at_end": all(w["healthy"] for w in quiet.values()),
    }
    kinds = collections.Counter(error_kind(r) for r in rows if r["status"] != 200)
    by_kind = {k: [a for a in actions if a.kind == k] for k in ("kill", "stop")}
    payload = {
        "config": {"workers": "1 prefill + 2 decode (tcp, CPU)", "requests": args.requests,
                   "concurrency": args.concurrency, "fault_every_s": args.every,
                   "seed": args.seed, "max_tokens": MAX_TOKENS,
                   "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
                   "request_timeout_s": REQUEST_TIMEOUT_S},
        "duration_s": round(duration, 1),
        "requests": len(rows), "succeeded": len(ok),
        "success_rate": round(len(ok) / max(1, len(rows)), 4),
        "error_kinds": dict(kinds.most_common()),
        "faults": {k: len(v) for k, v in by_kind.items()},
        "detect_dead_peer": summarize(by_kind["kill"], "detect_s"),
        "detect_stopped_peer": summarize(by_kind["stop"], "detect_s"),
        "recover_after_restart": summarize(by_kind["kill"], "recover_s"),
        "recover_after_continue": summarize(by_kind["stop"], "recover_s"),
        "outage_kill": summarize(by_kind["kill"], "outage_s"),
        "outage_stop": summarize(by_kind["stop"], "outage_s"),
        "actions": [{"kind": a.kind, "worker": a.worker,
                     "at_s": round(a.t_fault - t_start, 1), "detect_s": a.detect_s,
                     "recover_s": a.recover_s, "outage_s": a.outage_s} for a in actions],
        "invariants": invariants,
        "leaks": leaks, "late_requests": len(late), "wrong_tokens": len(wrong),
        "unexpected_deaths": unexpected_deaths,
        "note": ("detect: fault -> the router's registry marks the worker unhealthy "
                 f"(heartbeat time-out {HEARTBEAT_TIMEOUT_S:g} s, polled every 0.2 s); "
                 "recover: restart launched (kill) or SIGCONT (stop) -> healthy again, "
                 "which includes a restarted worker's start-up and the ejection back-off; "
                 "outage: fault -> healthy again. Measured on a shared 2-core CPU box."),
    }
    path = write_result(args.name, payload)
    print(json.dumps({k: payload[k] for k in ("requests", "succeeded", "success_rate",
                                              "error_kinds", "faults", "detect_dead_peer",
                                              "detect_stopped_peer", "recover_after_restart",
                                              "recover_after_continue", "invariants")},
                     indent=1))
    print(f"wrote {path}")
    return 0 if all(invariants.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
