"""SLO admission: admit, wait within the bound, or 429 with the predicted Retry-After."""

from pdserve.router.admission import SloConfig, decide
from pdserve.router.selector import Candidate, Choice


def choice(ttft_s: float, meets: bool, feasible: bool = True) -> Choice:
    c = Candidate("p0", "d0", 0, ttft_s, 0.0, 0.0, ttft_s, 0.01, ttft_s, feasible, meets)
    return Choice(c, 1, meets)


def test_admit_when_the_choice_meets_the_slo():
    assert decide(choice(0.5, True), SloConfig(ttft_s=1.0), 100, 99.0, 1.0).action == "admit"


def test_wait_while_the_queue_and_the_time_allow():
    slo = SloConfig(ttft_s=1.0, max_waiting=2, max_wait_s=1.0, poll_s=0.25)
    d = decide(choice(3.0, False), slo, num_waiting=1, waited_s=0.5, ttft_slo_s=1.0)
    assert (d.action, d.wait_s) == ("wait", 0.25)
    assert d.reason.startswith("no placement meets the SLO (best: p0->d0: ttft 3000.00ms")


def test_reject_with_retry_after_when_full_or_waited_too_long():
    slo = SloConfig(ttft_s=1.0, max_waiting=2, max_wait_s=1.0, poll_s=0.25)
    full = decide(choice(3.5, False), slo, num_waiting=2, waited_s=0.0, ttft_slo_s=1.0)
    assert (full.action, full.retry_after_s) == ("reject", 2.5)
    late = decide(choice(1.2, False), slo, num_waiting=0, waited_s=0.8, ttft_slo_s=1.0)
    assert (late.action, late.retry_after_s) == ("reject", 1.0)  # at least min_retry_s
    no_room = decide(choice(0.1, False, feasible=False), slo, 5, 0.0, None)
    assert no_room.action == "reject" and no_room.reason.startswith("no decode worker has")


def test_per_request_targets_override_the_config():
    slo = SloConfig(ttft_s=1.0, tpot_s=0.05)
    assert slo.targets() == (1.0, 0.05)
    assert slo.targets(ttft_s=0.2) == (0.2, 0.05)
    assert SloConfig().targets(None, 0.1) == (None, 0.1)
