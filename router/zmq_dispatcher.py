"""The production ``Dispatcher``: requests to workers over ZeroMQ, tokens back.

    generate(): choose a decode worker (and, disaggregated, a prefill worker),
                PUSH a GenerateRequest to the decode worker, then relay the
                TokenDeltas that arrive on the router's PULL socket.
    abort():    PUSH an Abort to the decode worker (it tells its prefill peer).
    watchdog:   a request whose decode worker stops being healthy ends with an
                error delta (never a hang, never a silent cut), and an Abort is
                queued for that worker in case it comes back.

With a ``Placer`` (router/placement.py) the pair comes from the prefix index and the
cost-model selector, with SLO admission; without one, ``choose`` is least-loaded.
"""

import asyncio
import contextlib
import time

import msgspec
import zmq
import zmq.asyncio

from pdserve.engine import messages as m
from pdserve.engine.request_state import RequestState, StateTable
from pdserve.router.admission import SloTargets
from pdserve.router.dispatcher import DispatchError
from pdserve.router.registry import Registry, WorkerState


def _load(w: WorkerState) -> tuple[int, int]:
    return (w.inflight + w.report.get("waiting", 0), -w.report.get("free_blocks", 0))


class ZmqDispatcher:
    def __init__(self, model_name: str, tokenizer, max_model_len: int, registry: Registry,
                 token: str, mode: str, host: str = "127.0.0.1", placer=None) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.registry = registry
        self.token = token
        self.mode = mode
        self.ctx = zmq.asyncio.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        port = self.pull.bind_to_random_port(f"tcp://{host}")
        self.token_address = f"tcp://{host}:{port}"
        self._push: dict[str, zmq.asyncio.Socket] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._placement: dict[str, tuple[WorkerState, WorkerState | None]] = {}
        self._tasks: list[asyncio.Task] = []
        self.decisions = {"remote_prefill": 0, "local_prefill": 0}
        self.dropped_frames = 0
        self.states = StateTable()  # the router's view of every live request
        self.reroutes = 0
        self.placer = placer

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch())]
        if self.placer is not None:
            await self.placer.start()

    async def close(self) -> None:
        if self.placer is not None:
            await self.placer.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.ctx.destroy(linger=0)

    # ---- choosing --------------------------------------------------------------------
    def choose(self) -> tuple[WorkerState, WorkerState | None]:
        decodes = self.registry.healthy("decode", "colocated")
        if not decodes:
            raise DispatchError("no healthy decode worker", 503, retry_after_s=1)
        decode = min(decodes, key=_load)
        prefill = None
        if self.mode == "disaggregated" and decode.role == "decode":
            prefills = self.registry.healthy("prefill")
            if prefills:
                prefill = min(prefills, key=_load)
        return decode, prefill

    # ---- the Dispatcher interface -------------------------------------------------------
    async def _place(self, request_id, prompt_token_ids, sampling, slo):
        """(decode, prefill | None, placement | None): the Placer's choice (with SLO
        admission: may wait, or raise DispatchError 429), else choose()."""
        if self.placer is None:
            return (*self.choose(), None)
        slo = slo or SloTargets()
        p = await self.placer.place(request_id, prompt_token_ids, sampling.max_tokens,
                                    ttft_slo_s=slo.ttft_s, tpot_slo_s=slo.tpot_s)
        workers = self.registry.workers
        return workers[p.decode_id], workers[p.prefill_id] if p.prefill_id else None, p

    async def generate(self, request_id, prompt_token_ids, sampling, deadline, slo=None):
        decode, prefill, placed = await self._place(request_id, prompt_token_ids, sampling,
                                                    slo)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._placement[request_id] = (decode, prefill)
        decode.inflight += 1
        if prefill is not None:
            prefill.inflight += 1
        self.decisions["remote_prefill" if prefill else "local_prefill"] += 1
        prefill_done = prefill is None
        finished = False
        states = self.states
        states.set(request_id, RequestState.QUEUED)
        states.set(request_id, RequestState.TRANSFERRING if prefill else RequestState.PREFILLING)
        try:
            await self._send(decode.request_address, m.GenerateRequest(
                token=self.token, request_id=request_id, prompt_token_ids=prompt_token_ids,
                sampling=sampling, prefill_worker=prefill.request_address if prefill else None,
                deadline=deadline))
            while True:
                delta = await queue.get()
                if placed is not None:
                    self.placer.first_delta(placed, delta.num_cached_tokens)
                if not prefill_done:
                    prefill_done = True
                    prefill.inflight -= 1
                if delta.error is not None:
                    states.set(request_id, RequestState.FAILED)
                elif delta.finished:
                    states.set(request_id, RequestState.FINISHED
                               if delta.finish_reason != "abort" else RequestState.ABORTED)
                elif delta.token_ids:
                    states.set(request_id, RequestState.DECODING)
                if delta.finished or delta.error is not None:
                    finished = True
                yield delta
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            self._placement.pop(request_id, None)
            if placed is not None:
                self.placer.done(placed)
            if not finished:  # closed early (disconnect, time-out): stop it on the workers
                states.set(request_id, RequestState.ABORTED)
                self._send_nowait(decode.request_address, m.Abort(self.token, request_id))
            decode.inflight -= 1
            if not prefill_done:
                prefill.inflight -= 1

    async def abort(self, request_id: str) -> None:
        placed = self._placement.get(request_id)
        if placed is not None:
            await self._send(placed[0].request_address, m.Abort(self.token, request_id))

    def ready(self) -> tuple[bool, str]:
        if not self.registry.healthy("decode", "colocated"):
            return False, "no healthy decode worker"
        return True, ""

    def status(self) -> dict:
        out = {"model": self.model_name, "mode": self.mode,
               "workers": self.registry.status(), "routing": dict(self.decisions),
               "requests": {"live": self.states.live(), "ended": dict(self.states.counts),
                            "reroutes": self.reroutes}}
        if self.placer is not None:
            out["slo"] = self.placer.slo.as_dict()
        return out

    def metrics_text(self) -> str:
        lines = ["# TYPE pdserve_routing_decisions_total counter"]
        for kind, n in self.decisions.items():
            lines.append(f'pdserve_routing_decisions_total{{kind="{kind}"}} {n}')
        rows = self.registry.status()
        lines.append("# TYPE pdserve_worker_free_blocks gauge")
        for row in rows:
            lines.append(f'pdserve_worker_free_blocks{{worker="{row["name"]}"}} '
                         f'{row["free_blocks"]}')
        for name, help_ in (("prefill_tokens", "Prompt tokens the worker computed"),
                            ("prefix_cached_tokens", "Prompt tokens found in its prefix cache"),
                            ("prefill_requests", "Prompts whose computation started there")):
            lines += [f"# HELP pdserve_worker_{name}_total {help_}",
                      f"# TYPE pdserve_worker_{name}_total counter"]
            lines += [f'pdserve_worker_{name}_total{{worker="{row["name"]}"}} {row[name]}'
                      for row in rows]
        if self.placer is not None:
            lines.extend(self.placer.metrics_lines())
        return "\n".join(lines) + "\n"

    # ---- plumbing ------------------------------------------------------------------------
    async def _send(self, address: str, msg) -> None:
        sock = self._push.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            self._push[address] = sock
        await sock.send(m.encode(msg))

    def _send_nowait(self, address: str, msg) -> None:
        """Queue a frame without awaiting (safe inside a closing generator)."""
        sock = self._push.get(address)
        if sock is not None:
            sock.send(m.encode(msg), zmq.NOBLOCK)

    async def _receive(self) -> None:
        while True:
            frame = await self.pull.recv()
            try:
                batch = m.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.dropped_frames += 1
                continue
            if not isinstance(batch, m.TokenBatch) or batch.token != self.token:
                self.dropped_frames += 1
                continue
            for delta in batch.deltas:
                queue = self._queues.get(delta.request_id)
                if queue is not None:  # late frames of finished requests are ignored
                    queue.put_nowait(delta)

    async def _watch(self) -> None:
        """End requests on a dead decode worker with an error; reroute hand-offs whose
        prefill peer stopped reporting to a local prefill on their decode worker."""
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            timeout = self.registry.heartbeat_timeout_s
            for rid, (decode, prefill) in list(self._placement.items()):
                if now - decode.last_report_at > timeout:
                    queue = self._queues.get(rid)
                    if queue is not None:
                        queue.put_nowait(m.TokenDelta(
                            request_id=rid, token_ids=[], text="", finished=True,
                            finish_reason="abort",
                            error=f"decode worker {decode.worker_id} stopped responding"))
                        # queued for it: a worker that comes back drops the request
                        with contextlib.suppress(zmq.Again):
                            self._send_nowait(decode.request_address,
                                              m.Abort(self.token, rid))
                elif (prefill is not None and now - prefill.last_report_at > timeout
                      and self.states.get(rid) == RequestState.TRANSFERRING):
                    self.states.set(rid, RequestState.PREFILLING)
                    self.reroutes += 1
                    await self._send(decode.request_address, m.Reroute(
                        self.token, rid, f"prefill worker {prefill.worker_id} stopped "
                        "responding"))
