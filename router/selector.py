"""The pair selector: a pure function from a snapshot of the cluster to a placement.

For one request it scores every candidate placement

    remote: (prefill worker P, decode worker D)   P computes, the KV goes to D
    local:  (None, decode worker D)               D computes its own prompt

with one cost line, lower is better (seconds)::

    ttft  = queue + compute + transfer
      queue    = prefill(queued tokens on the computing worker)
                 (+ for local: one decode step of D's batch per prefill chunk, since
                  D's running batch shares its steps with the prompt)
      compute  = prefill(prompt - cached on the computing worker, after that prefix)
      transfer = transfer(prompt blocks D lacks, P -> D)      (remote only)
    tpot  = decode_step(D's batch + 1, D's context + prompt)
    cost  = ttft + tpot_weight * max_tokens * tpot
          + local_weight * compute * (D's batch + 1)                 (local only)

The last term charges a local prefill for the decode time it takes from D: every
sequence of D's batch, and the request itself, waits while D computes the prompt
(a remote prefill leaves D decoding). So a short or mostly cached prompt stays
local, a long uncached one goes to a prefill worker.

A candidate is *feasible* when D has the free blocks for the prompt blocks it lacks
plus one for the answer (as engines admit: the rest is found or preempted later);
it *meets the SLO* when its ttft and tpot are within the targets. The choice is
the lowest cost among those meeting the SLO, else among the feasible ones
(``Choice.meets_slo`` says which; admission decides what to do). At temperature
0 it is the argmin (ties: the first in worker order); above zero it samples
``p ~ exp(-(cost - min) / temperature)`` with the caller's rng.

Overrides pin a decode or prefill worker or force local / remote prefill. The
returned ``Choice`` carries the chosen candidate's terms for the log.
Bookkeeping (metrics, the index, in-flight counts) is the caller's.

Public names: ``WorkerView``, ``RequestView``, ``Overrides``, ``Candidate``,
``Choice``, ``select``.
"""

import math
import random
from dataclasses import dataclass

from pdserve.router.cost_model import CostModel


@dataclass(frozen=True)
class WorkerView:
    """One worker as the selector sees it for one request."""

    worker_id: str
    role: str  # "prefill" | "decode" | "colocated"
    num_cached_blocks: int = 0  # leading blocks of this request's prompt held here
    num_queued_prefill_tokens: int = 0  # uncached prompt tokens waiting to be computed
    num_running: int = 0  # sequences in the decode batch
    num_context_tokens: int = 0  # KV tokens the decode batch reads per step
    num_free_blocks: int = 1 << 30


@dataclass(frozen=True)
class RequestView:
    num_prompt_tokens: int
    max_tokens: int = 16
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None


@dataclass(frozen=True)
class Overrides:
    prefill: str = "auto"  # "auto" | "local" | "remote"
    decode_worker: str | None = None
    prefill_worker: str | None = None


@dataclass(frozen=True)
class Candidate:
    prefill_id: str | None  # None: prefilled on the decode worker
    decode_id: str
    num_cached_tokens: int  # prompt tokens the computing worker already holds
    queue_s: float
    compute_s: float
    transfer_s: float
    ttft_s: float
    tpot_s: float
    cost: float
    feasible: bool
    meets_slo: bool

    @property
    def kind(self) -> str:
        return "local_prefill" if self.prefill_id is None else "remote_prefill"

    def formula(self) -> str:
        """The cost line with its terms, for the log."""
        where = self.prefill_id or "local"
        return (f"{where}->{self.decode_id}: ttft {self.ttft_s * 1e3:.2f}ms = queue "
                f"{self.queue_s * 1e3:.2f} + compute {self.compute_s * 1e3:.2f} + transfer "
                f"{self.transfer_s * 1e3:.2f}; tpot {self.tpot_s * 1e3:.2f}ms; cost "
                f"{self.cost:.4f}s; cached {self.num_cached_tokens} tokens")


@dataclass(frozen=True)
class Choice:
    best: Candidate
    num_candidates: int
    meets_slo: bool

    @property
    def prefill_id(self) -> str | None:
        return self.best.prefill_id

    @property
    def decode_id(self) -> str:
        return self.best.decode_id


def _score(req: RequestView, p: WorkerView | None, d: WorkerView, cost: CostModel,
           tpot_weight: float, local_weight: float) -> Candidate:
    b = cost.block_size
    n = req.num_prompt_tokens
    num_prompt_blocks = -(-n // b)
    comp = p or d
    # at least the last prompt token is always computed (it yields the first token)
    cached = min(comp.num_cached_blocks * b, n - 1)
    queue = cost.prefill_s(comp.num_queued_prefill_tokens)
    compute = cost.prefill_s(n - cached, cached)
    transfer = interference = 0.0
    if p is None:
        interference = local_weight * compute * (d.num_running + 1)
        chunks = -(-(comp.num_queued_prefill_tokens + n - cached) // cost.prefill_chunk_tokens)
        queue += chunks * cost.decode_step(d.num_running, d.num_context_tokens)
    else:
        transfer = cost.transfer_s(num_prompt_blocks - min(d.num_cached_blocks,
                                                           num_prompt_blocks), p.worker_id,
                                   d.worker_id)
    ttft = queue + compute + transfer
    tpot = cost.decode_step(d.num_running + 1, d.num_context_tokens + n)
    need = num_prompt_blocks - min(d.num_cached_blocks, num_prompt_blocks) + 1
    feasible = need <= d.num_free_blocks
    meets = feasible and (req.ttft_slo_s is None or ttft <= req.ttft_slo_s) and \
        (req.tpot_slo_s is None or tpot <= req.tpot_slo_s)
    return Candidate(p.worker_id if p else None, d.worker_id, cached, queue, compute,
                     transfer, ttft, tpot,
                     ttft + tpot_weight * req.max_tokens * tpot + interference, feasible, meets)


def candidates(req: RequestView, workers: tuple[WorkerView, ...], cost: CostModel,
               overrides: Overrides = Overrides(), tpot_weight: float = 1.0,
               local_weight: float = 1.0) -> list[Candidate]:
    """Every placement the overrides allow, scored, in worker order. Pure."""
    o = overrides
    decodes = [w for w in workers if w.role in ("decode", "colocated")
               and o.decode_worker in (None, w.worker_id)]
    prefills = [w for w in workers if w.role == "prefill"
                and o.prefill_worker in (None, w.worker_id)]
    out = []
    for d in decodes:
        if o.prefill != "remote" and o.prefill_worker is None:
            out.append(_score(req, None, d, cost, tpot_weight, local_weight))
        if o.prefill != "local" and d.role == "decode":
            out.extend(_score(req, p, d, cost, tpot_weight, local_weight) for p in prefills)
    return out


def select(req: RequestView, workers: tuple[WorkerView, ...], cost: CostModel,
           overrides: Overrides = Overrides(), temperature: float = 0.0,
           rng: random.Random | None = None, tpot_weight: float = 1.0,
           local_weight: float = 1.0) -> Choice | None:
    """The placement for ``req``, or None when the overrides leave no candidate. Pure
    (``rng`` is drawn from only when ``temperature > 0``)."""
    cands = candidates(req, workers, cost, overrides, tpot_weight, local_weight)
    if not cands:
        return None
    pool = [c for c in cands if c.meets_slo] or [c for c in cands if c.feasible] or cands
    best = min(pool, key=lambda c: c.cost)
    if temperature > 0 and len(pool) > 1:
        weights = [math.exp(-(c.cost - best.cost) / temperature) for c in pool]
        best = (rng or random.Random()).choices(pool, weights)[0]
    return Choice(best, len(cands), best.meets_slo)
