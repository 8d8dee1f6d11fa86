"""The router's worker table, fed by the control plane (register + load reports).

A worker is *healthy* when its last report is younger than the heartbeat
time-out AND its engine loop went round recently (``loop_age_s``), so a worker
whose RPC thread answers while its engine is stuck is not healthy. A worker
that goes unhealthy is ejected and readmitted only after a back-off and a
fresh healthy report.
"""

import time
from dataclasses import dataclass, field


@dataclass
class WorkerState:
    worker_id: str
    role: str
    request_address: str
    kv_address: str
    total_blocks: int
    max_model_len: int
    pid: int
    registered_at: float
    last_report_at: float
    report: dict = field(default_factory=dict)
    ejected_until: float = 0.0
    num_ejections: int = 0
    inflight: int = 0  # requests the router has sent and not seen finish
    events_address: str = ""  # KV events PUB endpoint (router/kv_events.py)
    snapshot_address: str = ""


@dataclass(frozen=True)
class Expectation:
    """What every worker must agree on; a mismatch is refused at registration."""

    model: str
    block_size: int | None
    hash_seed: int | None
    hash_algorithm: str


class Registry:
    def __init__(self, expect: Expectation, heartbeat_timeout_s: float = 3.0,
                 loop_stall_s: float = 5.0, backoff_s: float = 2.0) -> None:
        self.expect = expect
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.loop_stall_s = loop_stall_s
        self.backoff_s = backoff_s
        self.workers: dict[str, WorkerState] = {}
        self._first: dict[str, int] = {}  # first registrant's block_size / hash_seed

    def register(self, info) -> str | None:
        """Admit a worker (``info``: a pb.WorkerInfo). Returns None, or the refusal reason
        naming the mismatched field. Mutates the table."""
        e = self.expect
        if info.model != e.model:
            return f"model mismatch: router serves {e.model!r}, worker has {info.model!r}"
        if info.hash_algorithm != e.hash_algorithm:
            return (f"hash algorithm mismatch: router {e.hash_algorithm}, "
                    f"worker {info.hash_algorithm}")
        for name, want in (("block_size", e.block_size), ("hash_seed", e.hash_seed)):
            got = getattr(info, name)
            want = self._first.get(name, want)
            if want is not None and got != want:
                return f"{name} mismatch: cluster uses {want}, worker {info.worker_id} has {got}"
        for name in ("block_size", "hash_seed"):
            self._first.setdefault(name, getattr(info, name))
        now = time.monotonic()
        self.workers[info.worker_id] = WorkerState(
            worker_id=info.worker_id, role=info.role, request_address=info.request_address,
            kv_address=info.kv_address, total_blocks=info.total_blocks,
            max_model_len=info.max_model_len, pid=info.pid, registered_at=now,
            last_report_at=now, events_address=info.events_address,
            snapshot_address=info.snapshot_address)
        return None

    def hash_params(self) -> tuple[int, int]:
        """(block_size, hash_seed) the cluster hashes prompts with. Pure."""
        e = self.expect
        block_size = e.block_size if e.block_size is not None else self._first.get(
            "block_size", 16)
        seed = e.hash_seed if e.hash_seed is not None else self._first.get("hash_seed", 0)
        return block_size, seed

    def report(self, worker_id: str, fields: dict) -> bool:
        """Record a load report. False if the worker is unknown. Mutates the table."""
        w = self.workers.get(worker_id)
        if w is None:
            return False
        w.report = fields
        w.last_report_at = time.monotonic()
        return True

    def is_healthy(self, w: WorkerState, now: float | None = None) -> bool:
        """Fresh report and a live engine loop, and not inside an ejection back-off.
        Ejects (mutates ``w``) when it finds the worker unhealthy."""
        now = time.monotonic() if now is None else now
        fresh = now - w.last_report_at < self.heartbeat_timeout_s
        loop_ok = w.report.get("loop_age_s", 0.0) < self.loop_stall_s
        if not (fresh and loop_ok):
            if w.ejected_until <= now:
                w.num_ejections += 1
            w.ejected_until = now + self.backoff_s * min(8, 2 ** (w.num_ejections - 1))
            return False
        return now >= w.ejected_until

    def healthy(self, *roles: str) -> list[WorkerState]:
        now = time.monotonic()
        return [w for w in self.workers.values() if w.role in roles and self.is_healthy(w, now)]

    def status(self) -> list[dict]:
        """JSON-able rows for ``pdserve status``. Pure apart from health bookkeeping."""
        now = time.monotonic()
        rows = []
        for w in self.workers.values():
            r = w.report
            rows.append({
                "name": w.worker_id, "role": w.role, "healthy": self.is_healthy(w, now),
                "request_address": w.request_address,
                "pid": w.pid, "running": r.get("running", 0), "waiting": r.get("waiting", 0),
                "free_blocks": r.get("free_blocks", w.total_blocks),
                "total_blocks": r.get("total_blocks", w.total_blocks),
                "kv_bytes_sent": r.get("kv_bytes_sent", 0),
                "kv_bytes_received": r.get("kv_bytes_received", 0),
                "kv_seconds": round(r.get("kv_seconds", 0.0), 6),
                "prefill_requests": r.get("prefill_requests", 0),
                "prefill_tokens": r.get("prefill_tokens", 0),
                "prefix_cached_tokens": r.get("prefix_cached_tokens", 0),
                "pending_transfers": r.get("pending_transfers", 0),
                "steps": r.get("steps", 0), "loop_age_s": round(r.get("loop_age_s", 0.0), 3),
                "last_report_age_s": round(now - w.last_report_at, 3),
                "inflight": w.inflight,
            })
        return rows
