"""Where the dispatcher's requests go: the bookkeeping around the pure selector.

    place(prompt)   hash the prompt (engine.block_hash, the cluster's seed and block
                    size) -> snapshot of every healthy worker (index hits, queued
                    prefill tokens, batch, free blocks) -> selector.select ->
                    admission.decide (admit / wait and select again / 429)
                    -> a ``Placement``; the router now counts the prompt as queued
                    on the computing worker and its blocks as *pending* there
    first_delta()   the prompt is computed: un-queue it; record predicted vs actual
                    prefix hit (``num_cached_tokens``) and TTFT
    done()          forget the request's pending blocks (the events have them now)

Pending blocks cover the time between a choice and the worker's ``stored`` events:
a second request with the same prefix, arriving while the first is still queued,
is scored as a hit on the worker that will hold it. Load reports feed the
``Calibrator`` (``refresh``). Everything here runs in the router's event loop.

Public names: ``Placement``, ``Placer``.
"""

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.engine.block_hash import hash_block_chain
from pdserve.router.admission import SloConfig, decide
from pdserve.router.cost_model import Calibrator, CostModel, load_profile
from pdserve.router.dispatcher import DispatchError
from pdserve.router.kv_events import KVEventSubscriber
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.selector import Candidate, Overrides, RequestView, WorkerView, select

log = logging.getLogger("pdserve.router.select")
DEFAULT_PROFILE = Path(__file__).resolve().parents[1] / "configs" / "profile-cpu.yaml"


@dataclass
class Placement:
    request_id: str
    decode_id: str
    prefill_id: str | None
    predicted: Candidate
    block_hashes: list[int]
    num_prompt_tokens: int
    placed_at: float = field(default_factory=time.monotonic)
    first_seen: bool = False

    @property
    def computing_id(self) -> str:
        return self.prefill_id or self.decode_id


class _Pending:
    """A ref-counted PrefixIndex of blocks that chosen workers are about to hold."""

    def __init__(self) -> None:
        self.index = PrefixIndex()
        self._refs: Counter = Counter()

    def add(self, worker_id: str, hashes: list[int]) -> None:
        for h in hashes:
            self._refs[worker_id, h] += 1
        self.index.store(worker_id, hashes)

    def drop(self, worker_id: str, hashes: list[int]) -> None:
        gone = []
        for h in hashes:
            self._refs[worker_id, h] -= 1
            if self._refs[worker_id, h] <= 0:
                del self._refs[worker_id, h]
                gone.append(h)
        self.index.remove(worker_id, gone)


class Placer:
    def __init__(self, registry, token: str, mode: str, profile: str | None = None,
                 slo: SloConfig | None = None, temperature: float = 0.0,
                 tpot_weight: float = 1.0) -> None:
        self.registry = registry
        self.mode = mode
        path = Path(profile) if profile else DEFAULT_PROFILE
        base = load_profile(path) if path.exists() else CostModel()
        self.calibrator = Calibrator(base)
        self.events = KVEventSubscriber(registry, token)
        self.index = self.events.index
        self.pending = _Pending()
        self.slo = slo or SloConfig()
        self.temperature = temperature
        self.tpot_weight = tpot_weight
        self.rng = random.Random(0)
        self.queued: Counter = Counter()  # worker -> prompt tokens placed, not yet computed
        self.context: Counter = Counter()  # decode worker -> prompt tokens of its requests
        self.running: Counter = Counter()  # decode worker -> requests placed, not finished
        self.num_waiting = 0
        self.stats = Counter()
        self._seen_reports: dict[str, int] = {}

    async def start(self) -> None:
        await self.events.start()
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def close(self) -> None:
        self._refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._refresher
        await self.events.close()

    async def _refresh_loop(self, period_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                self.refresh()
            except Exception:  # a bad report must not stop calibration for good
                log.exception("calibration refresh failed")

    # ---- the snapshot --------------------------------------------------------------------
    def refresh(self) -> None:
        """Feed new load reports to the calibrator (a decode worker's ``kv_received``
        peers, request addresses on the wire, renamed to worker ids)."""
        ids = {w.request_address: w.worker_id for w in self.registry.workers.values()}
        for w in self.registry.workers.values():
            if self._seen_reports.get(w.worker_id) != id(w.report) and w.report:
                self._seen_reports[w.worker_id] = id(w.report)
                report = w.report
                if report.get("kv_received"):
                    report = {**report, "kv_received": [
                        {**r, "peer": ids.get(r["peer"], r["peer"])}
                        for r in report["kv_received"]]}
                self.calibrator.observe(w.worker_id, report)

    def snapshot(self, hashes: list[int]) -> tuple[WorkerView, ...]:
        roles = ("decode", "colocated") + (("prefill",) if self.mode == "disaggregated" else ())
        hits = self.index.match(hashes)
        soon = self.pending.index.match(hashes)
        views = []
        for w in sorted(self.registry.healthy(*roles), key=lambda w: w.worker_id):
            r, wid = w.report, w.worker_id
            views.append(WorkerView(
                wid, w.role, num_cached_blocks=max(hits.get(wid, 0), soon.get(wid, 0)),
                num_queued_prefill_tokens=max(r.get("queued_prefill_tokens", 0),
                                              self.queued[wid]),
                num_running=max(r.get("running", 0) + r.get("waiting", 0), self.running[wid]),
                num_context_tokens=self.context[wid],
                num_free_blocks=r.get("free_blocks", w.total_blocks)))
        return tuple(views)

    def block_hashes(self, prompt_token_ids: list[int]) -> list[int]:
        block_size, seed = self.registry.hash_params()
        return hash_block_chain(prompt_token_ids, block_size, seed)

    # ---- placing ---------------------------------------------------------------------------
    async def place(self, request_id: str, prompt_token_ids: list[int], max_tokens: int | None,
                    overrides: Overrides | None = None, ttft_slo_s: float | None = None,
                    tpot_slo_s: float | None = None) -> Placement:
        """Choose (waiting within the SLO bound) and book the request. Raises DispatchError
        (503: no worker; 429 + Retry-After: the SLO cannot be met in time)."""
        self.refresh()
        hashes = self.block_hashes(prompt_token_ids)
        ttft_slo, tpot_slo = self.slo.targets(ttft_slo_s, tpot_slo_s)
        req = RequestView(len(prompt_token_ids), max_tokens or 16, ttft_slo, tpot_slo)
        t0 = time.monotonic()
        waiting = False
        try:
            while True:
                cost = self.calibrator.model
                choice = select(req, self.snapshot(hashes), cost, overrides or Overrides(),
                                self.temperature,
                                self.rng, self.tpot_weight)
                if choice is None:
                    raise DispatchError("no healthy decode worker", 503, retry_after_s=1)
                d = decide(choice, self.slo, self.num_waiting - waiting,
                           time.monotonic() - t0, ttft_slo)
                if d.action == "admit" or (ttft_slo is None and tpot_slo is None):
                    break  # without targets the workers' own queues absorb the load
                if d.action == "reject":
                    self.stats["rejected"] += 1
                    raise DispatchError(d.reason, 429, retry_after_s=d.retry_after_s)
                if not waiting:
                    waiting = True
                    self.num_waiting += 1
                    self.stats["waited"] += 1
                await asyncio.sleep(d.wait_s)
        finally:
            if waiting:
                self.num_waiting -= 1
        best = choice.best
        log.info("request %s: %s (%d candidates)", request_id, best.formula(),
                 choice.num_candidates)
        p = Placement(request_id, best.decode_id, best.prefill_id, best, hashes,
                      req.num_prompt_tokens)
        self.queued[p.computing_id] += req.num_prompt_tokens - best.num_cached_tokens
        self.running[p.decode_id] += 1
        self.context[p.decode_id] += req.num_prompt_tokens
        self.pending.add(p.computing_id, hashes)
        if p.prefill_id is not None:
            self.pending.add(p.decode_id, hashes)
        self.stats[best.kind] += 1
        return p

    def first_delta(self, p: Placement, num_cached_tokens: int) -> None:
        """The prompt is computed (first token or an early end). Records the metrics."""
        if p.first_seen:
            return
        p.first_seen = True
        self.queued[p.computing_id] -= p.num_prompt_tokens - p.predicted.num_cached_tokens
        s = self.stats
        s["first_tokens"] += 1
        s["predicted_cached_tokens"] += p.predicted.num_cached_tokens
        s["actual_cached_tokens"] += num_cached_tokens
        s["prefix_prediction_exact"] += num_cached_tokens == p.predicted.num_cached_tokens
        ttft = time.monotonic() - p.placed_at
        s["predicted_ttft_us"] += round(p.predicted.ttft_s * 1e6)
        s["actual_ttft_us"] += round(ttft * 1e6)
        s["ttft_abs_error_us"] += round(abs(ttft - p.predicted.ttft_s) * 1e6)

    def done(self, p: Placement) -> None:
        """The request ended (any way). Mutates the counters and the pending index."""
        if not p.first_seen:
            p.first_seen = True
            self.queued[p.computing_id] -= p.num_prompt_tokens - p.predicted.num_cached_tokens
        self.running[p.decode_id] -= 1
        self.context[p.decode_id] -= p.num_prompt_tokens
        self.pending.drop(p.computing_id, p.block_hashes)
        if p.prefill_id is not None:
            self.pending.drop(p.decode_id, p.block_hashes)

    # ---- metrics ------------------------------------------------------------------------
    def metrics_lines(self) -> list[str]:
        s = self.stats
        out = []

        def counter(name: str, value, help_: str) -> None:
            out.extend([f"# HELP pdserve_router_{name} {help_}",
                        f"# TYPE pdserve_router_{name} counter",
                        f"pdserve_router_{name} {value}"])

        counter("prefix_predicted_cached_tokens_total", s["predicted_cached_tokens"],
                "Prompt tokens the selector predicted cached on the computing worker")
        counter("prefix_actual_cached_tokens_total", s["actual_cached_tokens"],
                "Prompt tokens the worker reported cached (num_cached_tokens)")
        counter("prefix_prediction_exact_total", s["prefix_prediction_exact"],
                "Requests whose predicted prefix hit equalled the actual one")
        counter("first_tokens_total", s["first_tokens"], "Requests that reached a first token")
        counter("ttft_predicted_seconds_total", s["predicted_ttft_us"] / 1e6,
                "Sum of predicted TTFT (from placement)")
        counter("ttft_actual_seconds_total", s["actual_ttft_us"] / 1e6,
                "Sum of actual TTFT (from placement to the first delta)")
        counter("ttft_abs_error_seconds_total", s["ttft_abs_error_us"] / 1e6,
                "Sum of |actual - predicted| TTFT")
        counter("admission_waited_total", s["waited"], "Requests that waited for the SLO")
        counter("admission_rejected_total", s["rejected"], "Requests refused with 429")
        out.append("# TYPE pdserve_router_prefix_index_blocks gauge")
        for wid in self.index.workers():
            out.append(f'pdserve_router_prefix_index_blocks{{worker="{wid}"}} '
                       f'{self.index.num_blocks(wid)}')
        m = self.calibrator.model
        out.append("# TYPE pdserve_router_cost_coefficient gauge")
        for k in ("prefill_step_s", "prefill_token_s", "prefill_attn_s", "decode_step_s",
                  "decode_seq_s", "decode_ctx_s", "bandwidth_bytes_s"):
            out.append(f'pdserve_router_cost_coefficient{{name="{k}"}} {getattr(m, k):.6g}')
        out.append("# TYPE pdserve_router_pair_bandwidth_bytes_per_second gauge")
        for pair, bw in sorted(m.pair_bandwidth_bytes_s.items()):
            out.append(f'pdserve_router_pair_bandwidth_bytes_per_second{{pair="{pair}"}} '
                       f'{bw:.6g}')
        return out
