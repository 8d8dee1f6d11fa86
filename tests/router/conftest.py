"""A real in-process Dispatcher over SmolLM2's LLMEngine, and uvicorn servers around it.

    test thread ──httpx / openai──▶ uvicorn thread (its own event loop, the app)
                                        │ generate / abort
                                        ▼
                                  EngineDispatcher ──commands──▶ engine thread
                                        ▲                         (add/abort, step())
                                        └── TokenDelta via loop.call_soon_threadsafe

The engine is loaded once per session. ``EngineDispatcher.run_offline`` drives the
same engine directly (no HTTP) to get reference outputs.
"""

import asyncio
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import uvicorn

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.messages import SamplingSpec, TokenDelta
from pdserve.engine.outputs import StepDelta
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.admission import SloTargets
from pdserve.router.api import create_app

MODEL = "smollm2-135m"


def to_token_delta(d: StepDelta) -> TokenDelta:
    logprobs = None
    if d.new_logprobs:
        logprobs = [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in d.new_logprobs]
    return TokenDelta(request_id=d.request_id, token_ids=list(d.new_token_ids), text=d.new_text,
                      finished=d.finished, finish_reason=d.finish_reason,
                      stop_reason=d.stop_reason, logprobs=logprobs,
                      num_prompt_tokens=d.num_prompt_tokens,
                      num_output_tokens=d.num_output_tokens,
                      num_cached_tokens=d.num_cached_tokens)


class EngineDispatcher:
    """The ``Dispatcher`` protocol over one engine stepped by a background thread.

    ``aborted_ids`` lists every id ``abort`` was called with (tests read it)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.model_name = MODEL
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self.aborted_ids: list[str] = []
        self.slo_by_id: dict[str, SloTargets | None] = {}  # what generate was given
        self.lock = threading.Lock()  # held while anything touches the engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    # ---- engine thread -------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished() and self._commands.empty():
                self._wake.wait(0.05)
                self._wake.clear()
            out: list[TokenDelta] = []
            with self.lock:
                while not self._commands.empty():
                    out.extend(self._apply(self._commands.get()))
                if self.engine.has_unfinished():
                    out.extend(to_token_delta(d) for d in self.engine.step())
            for delta in out:
                sink = self._sinks.get(delta.request_id)
                if sink is not None:
                    loop, q = sink
                    loop.call_soon_threadsafe(q.put_nowait, delta)

    def _apply(self, command: tuple) -> list[TokenDelta]:
        if command[0] == "abort":
            self.engine.abort(command[1])
            return []
        _, rid, ids, params = command
        try:
            self.engine.add_request(rid, ids, params)
        except ValueError as e:
            return [TokenDelta(request_id=rid, token_ids=[], text="", error=str(e))]
        return []

    # ---- the Dispatcher protocol -----------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       sampling: SamplingSpec, deadline: float | None,
                       slo: SloTargets | None = None) -> AsyncIterator[TokenDelta]:
        self.slo_by_id[request_id] = slo
        q: asyncio.Queue = asyncio.Queue()
        self._sinks[request_id] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", request_id, list(prompt_token_ids), sampling.to_params()))
        self._wake.set()
        try:
            while True:
                delta = await q.get()
                yield delta
                if delta.finished or delta.error:
                    return
        finally:
            self._sinks.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self.aborted_ids.append(request_id)
        self._commands.put(("abort", request_id))
        self._wake.set()

    def ready(self) -> tuple[bool, str]:
        return (True, "") if self._thread.is_alive() else (False, "the engine thread died")

    def status(self) -> dict:
        return {"workers": [{"id": "inproc-0", "role": "colocated",
                             "num_free_blocks": self.engine.pool.num_free_blocks}]}

    def metrics_text(self) -> str:
        return ("# TYPE pdserve_test_free_blocks gauge\n"
                f"pdserve_test_free_blocks {self.engine.pool.num_free_blocks}\n")

    # ---- test helpers ----------------------------------------------------------------
    def run_offline(self, prompt_token_ids: list[int], params: SamplingParams) -> list[StepDelta]:
        """Drive the engine directly (no HTTP) for one request; it must be idle."""
        rid = f"offline-{time.monotonic_ns()}"
        with self.lock:
            assert not self.engine.has_unfinished()
            self.engine.add_request(rid, prompt_token_ids, params)
            out = []
            while self.engine.has_unfinished():
                out.extend(self.engine.step())
        return out

    def wait_idle(self, timeout: float = 20.0) -> bool:
        """True once nothing runs and every KV block is free again."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                pool = self.engine.pool
                idle = (self._commands.empty() and not self.engine.has_unfinished()
                        and pool.num_free_blocks == pool.num_blocks)
            if idle:
                return True
            time.sleep(0.02)
        return False


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_server(app) -> Server:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, loop="uvloop", log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < end, "uvicorn did not start"
        time.sleep(0.01)
    return Server(f"http://127.0.0.1:{port}", app, server, thread)


@pytest.fixture(scope="session")
def dispatcher():
    engine = LLMEngine(EngineConfig(model=MODEL, num_blocks=512))
    d = EngineDispatcher(engine)
    yield d
    d.close()


@pytest.fixture(scope="session")
def server(dispatcher):
    s = start_server(create_app(dispatcher))
    yield s
    s.stop()


@pytest.fixture
def idle(dispatcher):
    """Every test starts and ends with an idle engine holding no blocks."""
    assert dispatcher.wait_idle()
    yield dispatcher
    assert dispatcher.wait_idle(), "a request still holds KV blocks"


@pytest.fixture
def make_server(dispatcher):
    """``make_server(**create_app_kwargs)`` (or ``make_server(dispatcher=...)``): a fresh
    app and server, stopped after the test."""
    servers: list[Server] = []

    def make(dispatcher_=None, **kwargs) -> Server:
        s = start_server(create_app(dispatcher_ or dispatcher, **kwargs))
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def chat_ids(dispatcher):
    """``chat_ids(text)``: the templated prompt of one user message."""
    from pdserve.engine.tokenizer import apply_chat_template

    return lambda text: apply_chat_template(dispatcher.tokenizer,
                                            [{"role": "user", "content": text}])
