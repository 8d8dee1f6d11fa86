"""LeaseTable: grant, renew, release and lapse on an explicit clock; late renewals are
ignored and counted; the lease message round-trips on the request plane."""

import pytest

from pdserve.engine import messages as m
from pdserve.engine.lease import Lease, LeaseTable

D0 = "tcp://127.0.0.1:5001"  # decode peers, by request address
D1 = "tcp://127.0.0.1:5002"


def test_grant_sets_expiry_and_renew_extends_it():
    t = LeaseTable(2.0)
    t.grant("a", D0, now=10.0)
    t.grant("b", D0, now=10.5)
    assert t.get("a") == Lease(D0, 12.0) and t.get("b") == Lease(D0, 12.5)
    assert t.renew(D0, ["a"], now=11.0) == 1
    assert t.get("a") == Lease(D0, 13.0) and t.get("b") == Lease(D0, 12.5)
    assert len(t) == 2 and "a" in t and "c" not in t
    assert t.num_ignored_renewals == 0


def test_lapsed_returns_only_expired_holds_oldest_first_and_forgets_them():
    t = LeaseTable(1.0)
    t.grant("a", D0, now=0.0)  # expires 1.0
    t.grant("b", D1, now=0.5)  # 1.5
    t.grant("c", D0, now=0.2)  # 1.2
    assert t.lapsed(now=1.0) == []  # expiry is not before now
    assert t.lapsed(now=1.3) == [("a", Lease(D0, 1.0)), ("c", Lease(D0, 1.2))]
    assert len(t) == 1 and t.num_lapsed == 2
    assert t.lapsed(now=1.3) == []
    assert t.lapsed(now=2.0) == [("b", Lease(D1, 1.5))]
    assert t.num_lapsed == 3 and len(t) == 0


def test_renewal_keeps_a_hold_alive_past_its_first_expiry():
    t = LeaseTable(1.0)
    t.grant("a", D0, now=0.0)
    for now in (0.6, 1.2, 1.8, 2.4):  # renewed every 0.6 s: never lapses
        assert t.lapsed(now) == []
        assert t.renew(D0, ["a"], now) == 1
    assert t.lapsed(now=3.4) == []
    assert t.lapsed(now=3.5) == [("a", Lease(D0, 3.4))]


def test_late_renewals_are_ignored_and_cannot_revive_a_hold():
    t = LeaseTable(1.0)
    t.grant("a", D0, now=0.0)
    t.grant("b", D0, now=0.0)
    assert [rid for rid, _ in t.lapsed(now=5.0)] == ["a", "b"]
    # the stopped decode worker is continued and renews what it still thinks is held
    assert t.renew(D0, ["a", "b"], now=5.1) == 0
    assert t.num_ignored_renewals == 2
    assert len(t) == 0 and t.lapsed(now=100.0) == []


def test_only_the_granted_peer_can_renew():
    t = LeaseTable(1.0)
    t.grant("a", D0, now=0.0)
    assert t.renew(D1, ["a"], now=0.5) == 0
    assert t.num_ignored_renewals == 1
    assert t.get("a") == Lease(D0, 1.0)


def test_release_ends_a_hold_and_a_later_renewal_is_ignored():
    t = LeaseTable(1.0)
    t.grant("a", D0, now=0.0)
    assert t.release("a") is True
    assert t.release("a") is False
    assert t.renew(D0, ["a"], now=0.1) == 0 and t.num_ignored_renewals == 1
    assert t.lapsed(now=10.0) == [] and t.num_lapsed == 0


def test_a_second_grant_restarts_the_lease():
    t = LeaseTable(1.0)
    t.grant("a", D0, now=0.0)
    t.grant("a", D1, now=3.0)
    assert t.get("a") == Lease(D1, 4.0)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_lease_must_be_positive(bad):
    with pytest.raises(ValueError, match="lease_s must be > 0"):
        LeaseTable(bad)


def test_lease_renew_message_round_trips():
    msg = m.LeaseRenew("tok", D0, ["r1", "r2"])
    back = m.decode(m.encode(msg))
    assert back == msg and isinstance(back, m.LeaseRenew)
