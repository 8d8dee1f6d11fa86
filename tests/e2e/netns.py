"""Two network namespaces for the fault rows 6 and 7: the prefill worker in one, the
decode worker in the other, joined by their own veth pair (the P<->D link the test cuts
or degrades); the router stays in the root namespace, reached over one veth per side.

    root ns (router on 10.N.1.1) ── rA ═ vA ── ns A: prefill worker on 10.N.3.1 ─ pA
        │                                                                         ║ P<->D
        └──────────────────────── rB ═ vB ── ns B: decode worker on 10.N.3.2 ─── pB

Each worker binds its P<->D address; the root reaches it through that side's veth
(a /32 route), and nothing in A or B routes to the other except over pA ═ pB, so
cutting that link cuts exactly the KV plane and the prefill/decode request plane while
both workers keep answering the router. Needs root (CAP_NET_ADMIN) and ``ip``;
``unavailable()`` says what is missing instead.
"""

import os
import shutil
import subprocess
from dataclasses import dataclass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if shutil.which("ip") is None:
        return "needs the 'ip' command (iproute2)"
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) for 'ip netns add'"
    probe = f"pdprobe{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"'ip netns add' failed: {r.stderr.strip()} (needs CAP_NET_ADMIN)"
    _ip("netns", "del", probe, check=False)
    return None


def qdisc_unavailable(kind: str, args: list[str]) -> str | None:
    """Why ``tc qdisc add ... kind args`` cannot work here (e.g. no sch_netem), or None."""
    if shutil.which("tc") is None:
        return "needs the 'tc' command (iproute2)"
    ns = f"pdqd{os.getpid()}"
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "add", "q0", "type", "veth", "peer", "name", "q1")
        r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "q0",
                            "root", kind, *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return (f"the kernel refuses 'tc qdisc add ... {kind}' ({r.stderr.strip()}): "
                    f"sch_{kind} is not available")
        return None
    finally:
        _ip("netns", "del", ns, check=False)


@dataclass
class Topology:
    """The namespaces and addresses; ``setup`` builds them, ``teardown`` removes them."""

    tag: str  # unique per test process
    net: int  # second octet of 10.net.x.y

    @staticmethod
    def for_this_process() -> "Topology":
        pid = os.getpid()
        return Topology(tag=str(pid), net=100 + pid % 100)

    @property
    def ns_prefill(self) -> str:
        return f"pdA{self.tag}"

    @property
    def ns_decode(self) -> str:
        return f"pdB{self.tag}"

    @property
    def router_host(self) -> str:
        return f"10.{self.net}.1.1"

    @property
    def prefill_host(self) -> str:
        return f"10.{self.net}.3.1"

    @property
    def decode_host(self) -> str:
        return f"10.{self.net}.3.2"

    @property
    def link_prefill(self) -> str:  # the P<->D veth end inside the prefill namespace
        return f"pA{self.tag}"[:15]

    @property
    def link_decode(self) -> str:
        return f"pB{self.tag}"[:15]

    def setup(self) -> None:
        a, b, n = self.ns_prefill, self.ns_decode, self.net
        ra, rb = f"rA{self.tag}"[:15], f"rB{self.tag}"[:15]
        pa, pb = self.link_prefill, self.link_decode
        steps = [
            ("netns", "add", a), ("netns", "add", b),
            ("link", "add", ra, "type", "veth", "peer", "name", "vA", "netns", a),
            ("link", "add", rb, "type", "veth", "peer", "name", "vB", "netns", b),
            ("link", "add", pa, "netns", a, "type", "veth", "peer", "name", pb, "netns", b),
            ("addr", "add", f"10.{n}.1.1/24", "dev", ra), ("link", "set", ra, "up"),
            ("addr", "add", f"10.{n}.2.1/24", "dev", rb), ("link", "set", rb, "up"),
            ("-n", a, "addr", "add", f"10.{n}.1.2/24", "dev", "vA"),
            ("-n", b, "addr", "add", f"10.{n}.2.2/24", "dev", "vB"),
            ("-n", a, "addr", "add", f"{self.prefill_host}/24", "dev", pa),
            ("-n", b, "addr", "add", f"{self.decode_host}/24", "dev", pb),
        ]
        for ns, links in ((a, ("lo", "vA", pa)), (b, ("lo", "vB", pb))):
            steps += [("-n", ns, "link", "set", link, "up") for link in links]
        steps += [
            ("route", "add", f"{self.prefill_host}/32", "via", f"10.{n}.1.2"),
            ("route", "add", f"{self.decode_host}/32", "via", f"10.{n}.2.2"),
            ("-n", b, "route", "add", f"{self.router_host}/32", "via", f"10.{n}.2.1"),
        ]
        try:
            for step in steps:
                _ip(*step)
        except subprocess.CalledProcessError as e:
            self.teardown()
            raise RuntimeError(f"ip {' '.join(e.cmd[1:])}: {e.stderr.strip()}") from None

    def teardown(self) -> None:
        """Delete the root's veth ends (their peers go too) and both namespaces."""
        for root_end in (f"rA{self.tag}"[:15], f"rB{self.tag}"[:15]):
            _ip("link", "del", root_end, check=False)
        for ns in (self.ns_prefill, self.ns_decode):
            _ip("netns", "del", ns, check=False)

    def launch_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def set_link(self, up: bool) -> None:
        """Cut (down) or heal (up) the P<->D link, both ends."""
        state = "up" if up else "down"
        _ip("-n", self.ns_prefill, "link", "set", self.link_prefill, state)
        _ip("-n", self.ns_decode, "link", "set", self.link_decode, state)

    def shape_link(self, kind: str | None, args: list[str] = ()) -> None:
        """Put qdisc ``kind args`` on both ends of the P<->D link (None: remove it)."""
        for ns, dev in ((self.ns_prefill, self.link_prefill),
                        (self.ns_decode, self.link_decode)):
            tc = ["ip", "netns", "exec", ns, "tc", "qdisc"]
            if kind is None:
                subprocess.run([*tc, "del", "dev", dev, "root"], capture_output=True,
                               timeout=30)
            else:
                subprocess.run([*tc, "replace", "dev", dev, "root", kind, *args],
                               capture_output=True, text=True, check=True, timeout=30)
