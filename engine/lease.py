"""Leases on KV blocks that one worker holds for a peer.

A prefill worker holds a request's blocks for its decode peer from the
``PrefillRequest`` until the finish frame is sent. The decode worker renews the
lease (``LeaseRenew`` on the request plane, every third of the lease) while it
still expects the transfer; when a lease lapses the holder frees the blocks and
fails the transfer, and the decode worker, if it comes back, prefills locally.
A renewal for a lease that lapsed, ended, or was granted to another peer is
ignored and counted: a worker that was stopped and continued cannot bring a
hold back to life.

    grant(rid, peer, now) ──► held ◄── renew(peer, [rid], now): expiry = now + lease_s
                               │
                               ├── release(rid)  (finished, failed, aborted) ──► gone
                               └── lapsed(now)   (expiry passed) ──► gone, returned to
                                                  the caller, which frees the blocks

The table is pure bookkeeping: the caller passes the clock and frees the blocks.
"""

from dataclasses import dataclass


@dataclass
class Lease:
    peer: str  # the peer the blocks are held for (its request-plane address)
    expiry: float  # monotonic time after which the hold lapses


class LeaseTable:
    """Leases by request id. Not thread-safe: one loop thread owns it."""

    def __init__(self, lease_s: float) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.lease_s = lease_s
        self._leases: dict[str, Lease] = {}
        self.num_lapsed = 0  # holds freed because their peer stopped renewing
        self.num_ignored_renewals = 0  # renewals for a hold that is gone or not the peer's

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._leases

    def get(self, request_id: str) -> Lease | None:
        return self._leases.get(request_id)

    def grant(self, request_id: str, peer: str, now: float) -> None:
        """Hold for ``peer`` until ``now + lease_s`` (a second grant restarts it). Mutates."""
        self._leases[request_id] = Lease(peer, now + self.lease_s)

    def renew(self, peer: str, request_ids: list[str], now: float) -> int:
        """Extend ``peer``'s leases among ``request_ids`` to ``now + lease_s``; returns how
        many were renewed. The others (lapsed, released, another peer's) are counted in
        ``num_ignored_renewals`` and change nothing. Mutates."""
        renewed = 0
        for rid in request_ids:
            lease = self._leases.get(rid)
            if lease is None or lease.peer != peer:
                self.num_ignored_renewals += 1
                continue
            lease.expiry = now + self.lease_s
            renewed += 1
        return renewed

    def release(self, request_id: str) -> bool:
        """Forget a hold that ended normally. False if there was none. Mutates."""
        return self._leases.pop(request_id, None) is not None

    def lapsed(self, now: float) -> list[tuple[str, Lease]]:
        """Remove and return, oldest expiry first, the holds whose expiry is before ``now``;
        the caller frees their blocks. Mutates (and counts them in ``num_lapsed``)."""
        gone = sorted(((rid, lease) for rid, lease in self._leases.items()
                       if lease.expiry < now), key=lambda x: x[1].expiry)
        for rid, _ in gone:
            del self._leases[rid]
        self.num_lapsed += len(gone)
        return gone
