"""SLO admission: what to do when no placement meets the request's TTFT / TPOT targets.

    decide(choice, num_waiting) ->
        ADMIT                       the choice meets the SLO (or there is none to meet)
        WAIT  (retry in wait_s)     it does not, and fewer than ``max_waiting`` requests
                                    are already waiting: wait, then select again
        REJECT (retry_after_s)      the wait queue is full, or the request has waited
                                    ``max_wait_s`` already: 429 with Retry-After

Retry-After is the predicted time for the best candidate's queue to drain down to
the SLO: ``best.ttft - ttft_slo`` (at least ``min_retry_s``).

Targets come from the config (``SloConfig``: YAML ``router.slo``) and may be
overridden per request (``SloTargets``: the body's ``slo`` field);
``SloConfig.targets`` merges them. ``decide`` is pure; the waiting count and the
sleeping are the caller's (the dispatcher).

Public names: ``SloConfig``, ``SloTargets``, ``Decision``, ``decide``.
"""

from dataclasses import dataclass

from pdserve.router.selector import Choice


@dataclass(frozen=True)
class SloTargets:
    """One request's own targets; None: the config's."""

    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass(frozen=True)
class SloConfig:
    ttft_s: float | None = None  # None: no target
    tpot_s: float | None = None
    max_waiting: int = 64  # requests allowed to wait for a placement that meets the SLO
    max_wait_s: float = 5.0  # how long one request may wait before it is refused
    poll_s: float = 0.05  # how often a waiting request selects again
    min_retry_s: float = 1.0

    def targets(self, ttft_s: float | None = None,
                tpot_s: float | None = None) -> tuple[float | None, float | None]:
        """(ttft, tpot) targets: the request's own where given, else the config's. Pure."""
        return (self.ttft_s if ttft_s is None else ttft_s,
                self.tpot_s if tpot_s is None else tpot_s)

    def as_dict(self) -> dict:
        """The settings in the YAML's units, for ``/status``. Pure."""
        return {"ttft_ms": _ms(self.ttft_s), "tpot_ms": _ms(self.tpot_s),
                "max_queue_s": self.max_wait_s, "max_waiting": self.max_waiting}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 6)


@dataclass(frozen=True)
class Decision:
    action: str  # "admit" | "wait" | "reject"
    wait_s: float = 0.0
    retry_after_s: float = 0.0
    reason: str = ""


def decide(choice: Choice, slo: SloConfig, num_waiting: int, waited_s: float,
           ttft_slo_s: float | None) -> Decision:
    """Admit, wait or reject ``choice`` (see the module docstring). Pure."""
    if choice.meets_slo:
        return Decision("admit")
    best = choice.best
    if not best.feasible:
        why = f"no decode worker has the free blocks ({best.formula()})"
    else:
        why = f"no placement meets the SLO (best: {best.formula()})"
    over = best.ttft_s - ttft_slo_s if ttft_slo_s is not None else 0.0
    retry = max(slo.min_retry_s, over)
    if num_waiting < slo.max_waiting and waited_s + slo.poll_s <= slo.max_wait_s:
        return Decision("wait", wait_s=slo.poll_s, reason=why)
    return Decision("reject", retry_after_s=retry, reason=why)
