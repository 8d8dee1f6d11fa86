"""LayerPusher on the CPU: sends run inline, in order; a failed layer stops its request."""

import torch

from pdserve.kvfabric import FabricPeerError
from pdserve.prefill.layer_push import LayerPusher


def test_cpu_sends_inline_and_failures_are_collected_per_request():
    pusher = LayerPusher(torch.device("cpu"))
    sent: list[tuple[str, int]] = []

    def send(rid: str, layer: int, fail: bool = False):
        def run() -> int:
            if fail:
                raise FabricPeerError(f"peer of {rid} gone")
            sent.append((rid, layer))
            return 1
        return run

    pusher.push("a", send("a", 0))
    pusher.push("b", send("b", 0, fail=True))
    pusher.push("b", send("b", 1))  # skipped: an earlier layer of b failed
    pusher.push("a", send("a", 1))
    assert sent == [("a", 0), ("a", 1)]
    assert pusher.flush() == {"b": "peer of b gone"}
    assert pusher.flush() == {}
    pusher.push("b", send("b", 2))  # a new step: b may send again
    assert sent[-1] == ("b", 2)


def test_cpu_lets_programming_errors_through():
    pusher = LayerPusher(torch.device("cpu"))

    def broken() -> int:
        raise KeyError("bug")

    try:
        pusher.push("a", broken)
    except KeyError:
        pass
    else:
        raise AssertionError("a bug must not be swallowed on the CPU path")
