"""Continuous batching with chunked prefill, prefix reuse and recompute preemption.

Each step the scheduler hands out a token budget (``max_num_batched_tokens``):
running requests first (decodes take one token, unfinished prefills the rest
of their chunk), then waiting requests in arrival order, each starting from
its longest cached prefix. When blocks run out the most recently admitted
running request is preempted: its blocks are freed and it is recomputed
later from its prompt and the tokens it already produced.
"""

from collections import deque
from dataclasses import dataclass

from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan. Safe to use until the next ``schedule`` call."""

    scheduled: tuple[ScheduledRequest, ...]
    preempted_ids: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.num_preemptions = 0  # since start, for tests and metrics

    # ---- admission -----------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request. Mutates the waiting queue."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def reserve_for_transfer(self, request: Request) -> bool:
        """Decode side of a hand-off: take the request's cached prefix and blocks for
        its whole prompt now, and park it until its KV lands (``complete_transfer``).
        Returns False (nothing changed) if the pool is short.
        Mutates: request blocks/status, the pool, ``self.requests``."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        hits = self.kv.find_cached_prefix(request)
        if not self.kv.allocate_slots(request, request.num_prompt_tokens, hits):
            return False
        request.status = RequestStatus.WAITING_FOR_KV
        self.requests[request.request_id] = request
        return True

    def complete_transfer(self, request_id: str, first_token_id: int) -> Request:
        """The prompt's KV has landed: mark it computed, append the first token, and
        queue the request to decode. Mutates the request and the waiting queue."""
        request = self.requests[request_id]
        assert request.status == RequestStatus.WAITING_FOR_KV
        request.num_computed_tokens = request.num_prompt_tokens
        request.output_token_ids.append(first_token_id)
        self.kv.cache_full_blocks(request)
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        return request

    # ---- one step ------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Plan one step. Mutates queues, request blocks and ``num_computed_tokens``
        (advanced over prefix hits only; ``update`` advances over computed ones)."""
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new
                i += 1
                continue
            break
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                req = self.waiting[0]
                hits = self.kv.find_cached_prefix(req) if not req.blocks else []
                start = max(req.num_computed_tokens, len(hits) * self.kv.block_size)
                num_new = min(req.num_tokens - start, budget)
                if not self.kv.allocate_slots(req, start - req.num_computed_tokens + num_new,
                                              hits):
                    if not self.running:  # alone and still too big: cannot ever run
                        self.waiting.popleft()
                        self.finish(req, RequestStatus.FINISHED_LENGTH)
                        continue
                    break
                self.waiting.popleft()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, apply token-level stops.
        Returns the requests that got a new token. Mutates requests and queues."""
        updated = []
        for s in out.scheduled:
            req = s.request
            if req.status != RequestStatus.RUNNING:
                continue  # aborted during the step
            req.num_computed_tokens += s.num_new_tokens
            req.num_computed_total += s.num_new_tokens
            if req.num_computed_tokens < req.num_tokens:
                self.kv.cache_full_blocks(req)
                continue  # a prefill chunk that is not the last
            token = sampled[req.request_id]
            req.output_token_ids.append(token)
            self.kv.cache_full_blocks(req)
            updated.append(req)
            self._check_stop(req, token)
        return updated

    def _check_stop(self, req: Request, token: int) -> None:
        params = req.params
        if req.prefill_only:
            self.finish(req, RequestStatus.FINISHED_LENGTH, free=False)
        elif not params.ignore_eos and token in req.eos_token_ids:
            req.stop_reason = None
            self.finish(req, RequestStatus.FINISHED_STOPPED)
        elif token in params.stop_token_ids:
            req.stop_reason = token
            self.finish(req, RequestStatus.FINISHED_STOPPED)
        elif len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len:
            self.finish(req, RequestStatus.FINISHED_LENGTH)

    # ---- ending ----------------------------------------------------------------------
    def finish(self, req: Request, status: RequestStatus, free: bool = True) -> None:
        """End a request: drop it from every queue and (if ``free``) free its blocks.
        Idempotent. Mutates queues, the request and the pool."""
        if req.status.finished:
            return
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.request_id, None)
        req.status = status
        if free:
            self.kv.free(req)

    def release(self, req: Request) -> None:
        """Free the blocks of a finished request that kept them (``free=False``)."""
        self.kv.free(req)

    def abort(self, request_id: str) -> Request | None:
        """Abort a request in any unfinished state; frees its blocks. Returns it, or None
        if unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def has_work(self) -> bool:
        """Requests a step could run (running or waiting); requests held for a KV
        transfer are unfinished but not work until the transfer completes."""
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
