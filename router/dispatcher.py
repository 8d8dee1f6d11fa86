"""The router's view of the workers: one ``Dispatcher`` the HTTP layer programs against.

The HTTP front door (``api.py``) never talks to a worker directly. It hands a
tokenized prompt and a ``SamplingSpec`` to a ``Dispatcher`` and relays the
``TokenDelta`` stream it gets back. The production implementation (ZeroMQ to
the decode / colocated workers, pair selection, SLO admission) lives beside
this file; tests use an in-process one over an ``LLMEngine``.

Contract of ``generate``::

    async for delta in dispatcher.generate(rid, ids, spec, deadline, slo):
        ...            # token_ids / text / logprobs of the new tokens
                       # the last delta has finished=True (finish_reason stop|length|abort)
                       # or error set (the request failed server-side; nothing follows)

* ``request_id`` is minted by the router (unique, never a client's header).
* ``deadline`` is unix time (``time.time()``) after which workers may abort.
* ``slo``: the request's own TTFT / TPOT targets (``SloTargets``), passed by keyword
  only when the request set them (None: the config's); a dispatcher without SLO
  admission ignores it.
* Before its first delta, ``generate`` may raise ``DispatchError`` (no worker,
  overloaded: 429 with Retry-After); the client then gets that status.
* Stopping iteration early (``aclose``, cancellation) does NOT abort the
  request by itself: the caller must ``await dispatcher.abort(request_id)``,
  which is idempotent and a no-op for a finished or unknown id.
"""

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from pdserve.engine.messages import SamplingSpec, TokenDelta
from pdserve.router.admission import SloTargets


class DispatchError(Exception):
    """The request cannot be served now. ``status_code``: 429 (overloaded; retry after
    ``retry_after_s``) or 503 (no worker can take it)."""

    def __init__(self, message: str, status_code: int = 503,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.retry_after_s = retry_after_s


@runtime_checkable
class Dispatcher(Protocol):
    """What ``create_app`` needs from the serving back end."""

    model_name: str  # the only model id served (``/v1/models``, request ``model``)
    max_model_len: int  # prompt + output tokens the model's context holds
    tokenizer: Any  # a transformers tokenizer of the served model

    def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                 deadline: float | None, slo: SloTargets | None = None
                 ) -> AsyncIterator[TokenDelta]:
        """Start the request and yield its deltas until one is finished or has ``error``.
        Written as ``async def ... yield``; the request is queued on first iteration."""
        ...

    async def abort(self, request_id: str) -> None:
        """Abort the request wherever it is and free its blocks. Idempotent."""
        ...

    def ready(self) -> tuple[bool, str]:
        """(True, "") when requests can be served now, else (False, why). Pure."""
        ...

    def status(self) -> dict:
        """JSON-able cluster view (workers, their load) for ``pdserve status``. Pure."""
        ...

    def metrics_text(self) -> str:
        """Extra Prometheus exposition lines (may be ""). Pure."""
        ...
