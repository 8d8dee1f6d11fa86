"""A fabric peer in its own process, driven by the test over stdin/stdout.

The test process starts ``python fabric_actor.py`` and sends commands as
length-prefixed msgspec-msgpack lists ``[name, *args]``; the child answers
``["ok", result]`` or ``["err", exception type, message]``. Nothing is pickled.

Roles, chosen by the first command:
  ``receiver``: a KVReceiver on a poisoned cache; callbacks are recorded as events.
  ``sender``:   KVSenders (by name) over a seeded random cache (``make_cache``).
"""

import dataclasses
import os
import struct
import subprocess
import sys
import time

import msgspec
import torch

from pdserve.kvfabric import (
    FabricIdentity,
    FabricTransferCancelled,
    KVReceiver,
    KVSender,
    TransferPlan,
    get_transport,
)

SHAPE = dict(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=2, head_dim=32)
POISON = -7.0
TOKEN = "cluster-secret"


def identity(**over) -> FabricIdentity:
    from pdserve.engine.block_hash import HASH_ALGORITHM

    fields = dict(model="test-model", block_size=SHAPE["block_size"], dtype="float32",
                  num_layers=SHAPE["num_layers"], num_kv_heads=SHAPE["num_kv_heads"],
                  head_dim=SHAPE["head_dim"], hash_seed=1234, hash_algorithm=HASH_ALGORITHM)
    fields.update(over)
    return FabricIdentity(**fields)


def make_cache(seed: int | None) -> torch.Tensor:
    """[L, 2, NB, B, Hkv, D] float32: seeded random (sender) or poison (receiver)."""
    shape = (SHAPE["num_layers"], 2, SHAPE["num_blocks"], SHAPE["block_size"],
             SHAPE["num_kv_heads"], SHAPE["head_dim"])
    if seed is None:
        return torch.full(shape, POISON)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def plan_to_wire(plan: TransferPlan) -> dict:
    return dataclasses.asdict(plan)


def plan_from_wire(d: dict) -> TransferPlan:
    src = d["src_block_ids"]
    return TransferPlan(d["transfer_id"], d["request_id"], d["attempt"],
                        None if src is None else tuple(src), tuple(d["dst_block_ids"]),
                        d["num_layers"])


def _read(stream) -> bytes:
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError
    (n,) = struct.unpack("<I", head)
    return stream.read(n)


def _write(stream, obj) -> None:
    data = msgspec.msgpack.encode(obj)
    stream.write(struct.pack("<I", len(data)) + data)
    stream.flush()


class RemoteError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


class Actor:
    """The test's handle on a child process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)

    def call(self, name: str, *args):
        _write(self.proc.stdin, [name, *args])
        kind, *rest = msgspec.msgpack.decode(_read(self.proc.stdout))
        if kind == "err":
            raise RemoteError(*rest)
        return rest[0]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("exit")
            except (EOFError, OSError, RemoteError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class _Child:
    def __init__(self) -> None:
        self.receiver: KVReceiver | None = None
        self.senders: dict[str, KVSender] = {}
        self.events: list = []
        self.cache: torch.Tensor | None = None
        self.transports: dict = {}

    def layers(self):
        return [(self.cache[i, 0], self.cache[i, 1]) for i in range(self.cache.shape[0])]

    def transport(self, name):
        if name not in self.transports:
            self.transports[name] = get_transport(name)
        return self.transports[name]

    # receiver role
    def receiver_init(self, transport, device="cpu"):
        self.cache = make_cache(None).to(device)
        self.receiver = KVReceiver(self.layers(), identity(), TOKEN, self.transport(transport))
        return self.receiver.address

    def expect(self, plan, timeout_s):
        on_ok = lambda p, payload: self.events.append(["complete", p.transfer_id, payload])
        on_err = lambda p, reason: self.events.append(["error", p.transfer_id, reason])
        self.receiver.expect(plan_from_wire(plan), on_ok, on_err, timeout_s)

    def cancel(self, transfer_id):
        return self.receiver.cancel(transfer_id)

    def take_events(self):
        events, self.events = self.events, []
        return events

    def receiver_stats(self):
        r = self.receiver
        return dict(num_pending=r.num_pending, bytes_received=r.bytes_received,
                    num_dropped_frames=r.num_dropped_frames, num_connections=r.num_connections)

    def dump(self):
        return self.cache.cpu().numpy().tobytes()

    def repoison(self):
        self.cache.fill_(POISON)

    # sender role
    def sender_init(self, seed, device="cpu"):
        self.cache = make_cache(seed).to(device)

    def connect(self, name, address, transport, token=TOKEN, identity_over=None,
                fault_rate=None, fault_seed=None):
        self.senders[name] = KVSender(address, token, identity(**(identity_over or {})),
                                      self.transport(transport), fault_rate=fault_rate,
                                      fault_seed=fault_seed)

    def send(self, name, plan, layer_ids):
        plan = plan_from_wire(plan)
        return sum(self.senders[name].send_layer(plan, i, *self.layers()[i]) for i in layer_ids)

    def send_all(self, name, plan):
        """Every layer in one ``send_layers`` call."""
        return self.senders[name].send_layers(plan_from_wire(plan), self.layers())

    def finish(self, name, plan, payload):
        self.senders[name].finish(plan_from_wire(plan), payload)

    def transfer(self, name, plan, payload):
        """Every layer, then finish; the receiver's cancel (seen between calls) as a string."""
        plan = plan_from_wire(plan)
        try:
            for i, (k, v) in enumerate(self.layers()):
                self.senders[name].send_layer(plan, i, k, v)
            self.senders[name].finish(plan, payload)
        except FabricTransferCancelled as e:
            return str(e)
        return None

    def abort(self, name, plan):
        self.senders[name].abort(plan_from_wire(plan))

    def sender_stats(self, name):
        s = self.senders[name]
        return dict(bytes_sent=s.bytes_sent, is_alive=s.is_alive)

    def faults_injected(self, name):
        return {tid: list(pick) for tid, pick in self.senders[name].faults_injected.items()}

    def close_sender(self, name):
        self.senders.pop(name).close()

    def sleep(self, seconds):
        time.sleep(seconds)


def _main() -> None:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # library prints must not corrupt the command channel
    child = _Child()
    while True:
        try:
            name, *args = msgspec.msgpack.decode(_read(sys.stdin.buffer))
        except EOFError:
            break
        if name == "exit":
            _write(out, ["ok", None])
            break
        try:
            _write(out, ["ok", getattr(child, name)(*args)])
        except Exception as e:
            _write(out, ["err", type(e).__name__, str(e)])
    for s in child.senders.values():
        s.close()
    if child.receiver is not None:
        child.receiver.close()


if __name__ == "__main__":
    _main()
