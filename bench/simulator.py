"""A discrete-event cluster simulator that replays a trace through the router's selector.

    pdserve sim TRACE [--prefill 4 --decode 4] [--policy pdserve|round_robin|
                least_loaded|prefix] [--time-scale S] [--profile YAML] [--json]

Model (one H200 per worker by default; costs from the profile, the same
``CostModel`` the selector predicts with)::

    arrival --policy--> prefill worker P (FIFO, one prompt at a time)
                        hit = leading blocks in P's LRU cache at start
                        time = prefill(uncached after hit)
                        then KV transfer of the blocks D lacks -> first token
                    or  local prefill on decode worker D: chunks of
                        ``prefill_chunk_tokens`` share D's steps with its batch
    decode worker D: continuous batch; one step = decode_step(batch, context)

A worker's prefix cache is an LRU of block ids holding ``kv_tokens`` of KV (its
memory): prefill workers keep what they computed; decode workers keep what they
received or computed. The router sees exactly the caches (events without lag)
plus the blocks of requests it placed that are still queued (pending), like
router/placement.py.

Trace formats: Mooncake JSONL (``timestamp`` ms, ``input_length``,
``output_length``, ``hash_ids``: one id per 512-token block) and the Azure CSV
(no prefix information: every block is unique). Blocks are ``block_tokens`` long
(512 for Mooncake).

Reported: ``ttft_p50/p90``, ``tpot_p50/p90``, ``prefix_hit_rate`` (prompt tokens
served from the computing worker's cache), ``optimal_hit_rate`` (an unlimited
cache), ``pooled_hit_rate`` (one LRU with the capacity of the whole prefill pool,
every request routed to it), ``offered_load`` (prompt compute without any hit
over the prefill pool's time), ``goodput`` (requests/s meeting both SLOs) and
``slo_attainment``.
"""

import argparse
import csv
import dataclasses
import heapq
import itertools
import json
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pdserve.router.cost_model import CostModel, load_profile
from pdserve.router.selector import RequestView, WorkerView, select

POLICIES = ("pdserve", "round_robin", "least_loaded", "prefix")
PROFILE = Path(__file__).resolve().parents[1] / "configs" / "profile-h200-llama3-8b.yaml"


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...]


def load_trace(path: str, block_tokens: int = 512, limit: int | None = None
               ) -> list[TraceRequest]:
    """Mooncake JSONL or Azure CSV, arrival times from 0. Pure apart from reading."""
    out: list[TraceRequest] = []
    if path.endswith(".jsonl"):
        with open(path) as f:
            for line in itertools.islice(f, limit):
                r = json.loads(line)
                out.append(TraceRequest(r["timestamp"] / 1000, r["input_length"],
                                        max(1, r["output_length"]), tuple(r["hash_ids"])))
    else:
        with open(path) as f:
            rows = list(itertools.islice(csv.DictReader(f), limit))
        t0 = None
        fresh = itertools.count(1 << 40)
        for r in rows:
            t = datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp()
            t0 = t if t0 is None else t0
            n = int(r["ContextTokens"])
            out.append(TraceRequest(t - t0, n, max(1, int(r["GeneratedTokens"])),
                                    tuple(next(fresh) for _ in range(-(-n // block_tokens)))))
    return out


class LRUCache:
    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def prefix(self, hash_ids) -> int:
        """Leading blocks held. Pure."""
        n = 0
        for h in hash_ids:
            if h not in self.blocks:
                break
            n += 1
        return n

    def insert(self, hash_ids) -> None:
        for h in hash_ids:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


@dataclass
class Job:
    req: TraceRequest
    rid: int
    decode: "SimWorker"
    prefill: "SimWorker | None"
    predicted_cached: int
    num_cached_tokens: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    done_tokens: int = 0  # prompt tokens computed (local prefill) or output tokens made


@dataclass
class SimWorker:
    worker_id: str
    role: str
    cache: LRUCache
    queue: list = field(default_factory=list)  # prefill jobs, FIFO
    busy_until: float = 0.0
    current: Job | None = None
    batch: list = field(default_factory=list)  # decoding jobs
    stepping: bool = False
    queued_tokens: int = 0  # predicted uncached tokens queued (router's view)


class Simulator:
    def __init__(self, trace: list[TraceRequest], cost: CostModel, num_prefill: int,
                 num_decode: int, policy: str, time_scale: float = 1.0,
                 kv_tokens: int = 800_000, ttft_slo_s: float = 2.0,
                 tpot_slo_s: float = 0.05) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
        self.trace, self.cost, self.policy, self.time_scale = trace, cost, policy, time_scale
        self.ttft_slo_s, self.tpot_slo_s = ttft_slo_s, tpot_slo_s
        cap = kv_tokens // cost.block_size
        self.prefills = [SimWorker(f"p{i}", "prefill", LRUCache(cap)) for i in range(num_prefill)]
        self.decodes = [SimWorker(f"d{i}", "decode", LRUCache(cap)) for i in range(num_decode)]
        self.capacity_blocks = cap
        self.events: list = []
        self.seq = itertools.count()
        self.jobs: list[Job] = []
        self.pending: dict[str, dict[int, int]] = {}  # worker -> block id -> refs
        self.rr = itertools.count()

    # ---- event plumbing ---------------------------------------------------------------
    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self.events, (t, next(self.seq), fn, args))

    def run(self) -> dict:
        for i, r in enumerate(self.trace):
            self.at(r.arrival_s / self.time_scale, self.arrive, i, r)
        while self.events:
            t, _, fn, args = heapq.heappop(self.events)
            fn(t, *args)
        return self.report()

    # ---- routing ------------------------------------------------------------------------
    def _pending_prefix(self, w: SimWorker, hash_ids) -> int:
        mine = self.pending.get(w.worker_id, {})
        n = 0
        for h in hash_ids:
            if h not in mine and h not in w.cache.blocks:
                break
            n += 1
        return n

    def _pend(self, w: SimWorker, hash_ids, delta: int) -> None:
        mine = self.pending.setdefault(w.worker_id, {})
        for h in hash_ids:
            mine[h] = mine.get(h, 0) + delta
            if mine[h] <= 0:
                del mine[h]

    def _view(self, w: SimWorker, hash_ids) -> WorkerView:
        held = sum(-(-(j.req.input_len + j.done_tokens) // self.cost.block_size)
                   for j in w.batch) if w.role == "decode" else 0
        return WorkerView(w.worker_id, w.role, self._pending_prefix(w, hash_ids),
                          w.queued_tokens, len(w.batch),
                          sum(j.req.input_len + j.done_tokens for j in w.batch),
                          self.capacity_blocks - held)

    def route(self, r: TraceRequest) -> tuple[SimWorker | None, SimWorker]:
        ps, ds = self.prefills, self.decodes
        if self.policy == "round_robin":
            k = next(self.rr)
            return ps[k % len(ps)], ds[k % len(ds)]
        decode = min(ds, key=lambda w: (len(w.batch), w.queued_tokens))
        if self.policy == "least_loaded":
            return min(ps, key=lambda w: w.queued_tokens), decode
        if self.policy == "prefix":
            return max(ps, key=lambda w: (self._pending_prefix(w, r.hash_ids),
                                          -w.queued_tokens)), decode
        views = tuple(self._view(w, r.hash_ids) for w in ps + ds)
        choice = select(RequestView(r.input_len, r.output_len), views, self.cost)
        by_id = {w.worker_id: w for w in ps + ds}
        return (by_id[choice.prefill_id] if choice.prefill_id else None,
                by_id[choice.decode_id])

    def arrive(self, t: float, rid: int, r: TraceRequest) -> None:
        prefill, decode = self.route(r)
        comp = prefill or decode
        cached = min(self._pending_prefix(comp, r.hash_ids) * self.cost.block_size,
                     r.input_len - 1)
        job = Job(r, rid, decode, prefill, cached)
        self.jobs.append(job)
        comp.queued_tokens += r.input_len - cached
        self._pend(comp, r.hash_ids, +1)
        comp.queue.append(job)
        if prefill is not None:
            self._start_prefill(t, prefill)
        else:
            self._kick(t, decode)

    # ---- prefill workers --------------------------------------------------------------
    def _start_prefill(self, t: float, w: SimWorker) -> None:
        if w.current is not None or not w.queue:
            return
        job = w.current = w.queue.pop(0)
        r = job.req
        hit = min(w.cache.prefix(r.hash_ids) * self.cost.block_size, r.input_len - 1)
        w.cache.insert(r.hash_ids[:hit // self.cost.block_size])  # touch the hits
        job.num_cached_tokens = hit
        self.at(t + self.cost.prefill_s(r.input_len - hit, hit), self._prefill_done, w)

    def _prefill_done(self, t: float, w: SimWorker) -> None:
        job, w.current = w.current, None
        r = job.req
        w.cache.insert(r.hash_ids)
        w.queued_tokens -= r.input_len - job.predicted_cached
        self._pend(w, r.hash_ids, -1)
        d = job.decode
        lacking = len(r.hash_ids) - d.cache.prefix(r.hash_ids)
        self.at(t + self.cost.transfer_s(lacking, w.worker_id, d.worker_id), self._landed, job)
        self._start_prefill(t, w)

    def _landed(self, t: float, job: Job) -> None:
        job.decode.cache.insert(job.req.hash_ids)
        self._first_token(t, job)

    def _first_token(self, t: float, job: Job) -> None:
        job.first_token_s = t
        job.done_tokens = 1
        if job.req.output_len <= 1:
            job.finish_s = t
            return
        job.decode.batch.append(job)
        self._kick(t, job.decode)

    # ---- decode workers (continuous batch + local prefill chunks) ------------------------
    def _kick(self, t: float, w: SimWorker) -> None:
        if w.stepping or not (w.batch or w.queue):
            return
        w.stepping = True
        c = self.cost
        dt = c.decode_step(len(w.batch), sum(j.req.input_len + j.done_tokens for j in w.batch))
        chunk = None
        if w.queue:
            job = w.queue[0]
            if job.done_tokens == 0:  # its first chunk: look the prefix up now
                hit = min(w.cache.prefix(job.req.hash_ids) * c.block_size, job.req.input_len - 1)
                job.num_cached_tokens = job.done_tokens = hit
            chunk = min(c.prefill_chunk_tokens, job.req.input_len - job.done_tokens)
            dt += c.prefill_step_s + chunk * c.prefill_token_s + \
                chunk * (job.done_tokens + chunk / 2) * c.prefill_attn_s
        self.at(t + dt, self._step_done, w, chunk)

    def _step_done(self, t: float, w: SimWorker, chunk: int | None) -> None:
        w.stepping = False
        finished = []
        for job in w.batch:
            job.done_tokens += 1
            if job.done_tokens >= job.req.output_len:
                job.finish_s = t
                finished.append(job)
        for job in finished:
            w.batch.remove(job)
        if chunk is not None:
            job = w.queue[0]
            job.done_tokens += chunk
            if job.done_tokens >= job.req.input_len:
                w.queue.pop(0)
                w.queued_tokens -= job.req.input_len - job.predicted_cached
                self._pend(w, job.req.hash_ids, -1)
                w.cache.insert(job.req.hash_ids)
                self._first_token(t, job)
        self._kick(t, w)

    # ---- results --------------------------------------------------------------------------
    def report(self) -> dict:
        jobs = self.jobs
        ttft = sorted(j.first_token_s - j.req.arrival_s / self.time_scale for j in jobs)
        tpots = sorted((j.finish_s - j.first_token_s) / (j.req.output_len - 1)
                       for j in jobs if j.req.output_len > 1)
        good = sum(1 for j in jobs if j.first_token_s - j.req.arrival_s / self.time_scale
                   <= self.ttft_slo_s and (j.req.output_len <= 1 or (
                       j.finish_s - j.first_token_s) / (j.req.output_len - 1)
                       <= self.tpot_slo_s))
        span = max(j.finish_s for j in jobs) - min(j.req.arrival_s for j in jobs) / \
            self.time_scale
        total = sum(j.req.input_len for j in jobs)
        return {
            "policy": self.policy, "time_scale": self.time_scale,
            "num_requests": len(jobs),
            "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90),
            "tpot_p50": pct(tpots, 50), "tpot_p90": pct(tpots, 90),
            "prefix_hit_rate": sum(j.num_cached_tokens for j in jobs) / total,
            "optimal_hit_rate": hit_rate(self.trace, None, self.cost.block_size),
            "pooled_hit_rate": hit_rate(self.trace, self.capacity_blocks * len(self.prefills),
                                        self.cost.block_size),
            "offered_load": offered_load(self.trace, self.cost, len(self.prefills),
                                         self.time_scale),
            "goodput": good / span, "slo_attainment": good / len(jobs),
            "local_prefill_share": sum(j.prefill is None for j in jobs) / len(jobs),
        }


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of sorted ``xs``. Pure."""
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, max(0, -(-len(xs) * q // 100) - 1))]


def hit_rate(trace: list[TraceRequest], capacity_blocks: int | None, block_tokens: int) -> float:
    """Prompt tokens hit by one LRU cache of ``capacity_blocks`` (None: unlimited) that
    sees every request in arrival order (the last token is always computed). Pure."""
    cache = LRUCache(capacity_blocks if capacity_blocks is not None else 1 << 62)
    hit = total = 0
    for r in sorted(trace, key=lambda r: r.arrival_s):
        hit += min(cache.prefix(r.hash_ids) * block_tokens, r.input_len - 1)
        total += r.input_len
        cache.insert(r.hash_ids)
    return hit / total


def offered_load(trace: list[TraceRequest], cost: CostModel, num_prefill: int,
                 time_scale: float) -> float:
    """Prefill compute the trace asks for without any cache hit, over the prefill pool's
    time at this replay speed. Pure."""
    work = sum(cost.prefill_s(r.input_len) for r in trace)
    span = (max(r.arrival_s for r in trace) - min(r.arrival_s for r in trace)) / time_scale
    return work / (num_prefill * max(span, 1e-9))


def simulate(trace, cost, num_prefill=4, num_decode=4, policy="pdserve", time_scale=1.0,
             **kw) -> dict:
    return Simulator(trace, cost, num_prefill, num_decode, policy, time_scale, **kw).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--prefill", type=int, default=4)
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--policy", choices=POLICIES, default="pdserve")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--profile", default=str(PROFILE))
    ap.add_argument("--block-tokens", type=int, default=512)
    ap.add_argument("--kv-tokens", type=int, default=800_000)
    ap.add_argument("--ttft-slo", type=float, default=2.0)
    ap.add_argument("--tpot-slo", type=float, default=0.05)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    cost = dataclasses.replace(load_profile(a.profile), block_size=a.block_tokens)
    trace = load_trace(a.trace, a.block_tokens, a.limit)
    res = simulate(trace, cost, a.prefill, a.decode, a.policy, a.time_scale,
                   kv_tokens=a.kv_tokens, ttft_slo_s=a.ttft_slo, tpot_slo_s=a.tpot_slo)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:20s} {v:.4f}" if isinstance(v, float) else f"{k:20s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
