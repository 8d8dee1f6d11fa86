"""One request state machine that the router, the prefill worker and the decode worker
agree on. Each side tracks the states it can see; the transitions are the same.

    QUEUED ─► PREFILLING ─► TRANSFERRING ─► DECODING ─► FINISHED
       │          │  ▲            │             │
       │          │  └─(reroute: prefill here)──┤
       └──────────┴────────┬──────┴─────────────┴─► ABORTED (client, time-out)
                           └─────────────────────► FAILED  (peer dead, bad KV)

A request whose hand-off fails goes back to PREFILLING on the decode worker (a new
attempt with a new transfer id) instead of failing, while it has produced no token.
"""

import enum


class RequestState(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED)


_S = RequestState
ALLOWED: dict[RequestState, frozenset[RequestState]] = {
    _S.QUEUED: frozenset({_S.PREFILLING, _S.TRANSFERRING, _S.DECODING, _S.ABORTED,
                          _S.FAILED}),
    _S.PREFILLING: frozenset({_S.TRANSFERRING, _S.DECODING, _S.FINISHED, _S.ABORTED,
                              _S.FAILED}),
    _S.TRANSFERRING: frozenset({_S.PREFILLING, _S.DECODING, _S.FINISHED, _S.ABORTED,
                                _S.FAILED}),
    _S.DECODING: frozenset({_S.FINISHED, _S.ABORTED, _S.FAILED}),
    _S.FINISHED: frozenset(),
    _S.ABORTED: frozenset(),
    _S.FAILED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


def advance(current: RequestState, new: RequestState) -> RequestState:
    """``new`` if the machine allows ``current -> new`` (or they are equal), else raises
    IllegalTransition. Pure."""
    if new == current or new in ALLOWED[current]:
        return new
    raise IllegalTransition(f"{current.value} -> {new.value}")


class StateTable:
    """Per-request states on one side. Terminal requests are forgotten, so a late message
    for them finds nothing and is ignored."""

    def __init__(self) -> None:
        self._states: dict[str, RequestState] = {}
        self.counts: dict[str, int] = {s.value: 0 for s in RequestState if s.terminal}

    def get(self, request_id: str) -> RequestState | None:
        return self._states.get(request_id)

    def set(self, request_id: str, new: RequestState) -> bool:
        """Advance; returns False (and changes nothing) for an unknown id unless ``new`` is
        QUEUED, or an illegal move. Mutates the table."""
        cur = self._states.get(request_id)
        if cur is None:
            if new != RequestState.QUEUED:
                return False
            self._states[request_id] = new
            return True
        try:
            advance(cur, new)
        except IllegalTransition:
            return False
        if new.terminal:
            del self._states[request_id]
            self.counts[new.value] += 1
        else:
            self._states[request_id] = new
        return True

    def live(self) -> dict[str, int]:
        """How many requests are in each non-terminal state. Pure."""
        out: dict[str, int] = {}
        for s in self._states.values():
            out[s.value] = out.get(s.value, 0) + 1
        return out
