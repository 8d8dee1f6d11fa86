"""KV fabric tests: real peers in separate processes (``fabric_actor.py``), CPU tensors.

``peers`` is one receiver process and one sender process per transport,
connected once per module (process start-up dominates the run time); each
test gets a freshly poisoned receiver cache and an empty event list.
"""

import importlib
import time

import pytest
from fabric_actor import Actor

SENDER_SEED = 7


def nixl_importable() -> bool:
    try:
        importlib.import_module("nixl._api")
    except ImportError:
        return False
    return True


class Peers:
    def __init__(self, transport: str, device: str = "cpu") -> None:
        self.transport = transport
        self.device = device
        self.receiver, self.sender = Actor(), Actor()
        self.address = self.receiver.call("receiver_init", transport, device)
        self.sender.call("sender_init", SENDER_SEED, device)
        self.sender.call("connect", "main", self.address, transport)

    def events(self, count: int, timeout_s: float = 10.0) -> list:
        """Wait for ``count`` receiver callbacks; returns exactly those seen."""
        events: list = []
        deadline = time.monotonic() + timeout_s
        while len(events) < count and time.monotonic() < deadline:
            events += self.receiver.call("take_events")
            time.sleep(0.02)
        time.sleep(0.05)
        return events + self.receiver.call("take_events")

    def stats(self) -> dict:
        return self.receiver.call("receiver_stats")

    def stop(self) -> None:
        self.sender.stop()
        self.receiver.stop()


def _transport_param(name: str):
    marks = [] if name == "tcp" or nixl_importable() else [
        pytest.mark.skip(reason="nixl is not importable")]
    return pytest.param(name, marks=marks, id=name)


TRANSPORTS = [_transport_param("tcp"), _transport_param("nixl")]
# cuda_ipc moves GPU memory only: the module's tests run on a GPU, both caches in VRAM
MODULE_TRANSPORTS = TRANSPORTS + [pytest.param("cuda_ipc", marks=pytest.mark.gpu,
                                               id="cuda_ipc")]


@pytest.fixture(scope="module", params=MODULE_TRANSPORTS)
def module_peers(request):
    peers = Peers(request.param, device="cuda" if request.param == "cuda_ipc" else "cpu")
    yield peers
    peers.stop()


@pytest.fixture
def peers(module_peers):
    module_peers.receiver.call("repoison")
    module_peers.receiver.call("take_events")
    return module_peers
