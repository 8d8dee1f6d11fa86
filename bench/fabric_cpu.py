"""KV fabric throughput on the CPU: tcp and nixl against a plain socket copy.

Two processes (spawned; the parent only sends them small control tuples) move
one request's KV, layer by layer, prefill cache -> decode cache, with
``KVSender``/``KVReceiver``. The baseline, measured in the same run, is a
plain Python socket moving the same bytes in the same per-layer chunks from
one preallocated buffer into another (``sendall`` / ``recv_into``): the
fabric adds gather, scatter, framing and completion on top of that.

Time is CLOCK_MONOTONIC (system-wide): from the sender's first ``send_layer``
to the receiver's ``on_complete``. All three pairs stay up and take turns,
one transfer each per repetition, so load from other work hits them alike.
The last repetition is checked for exact equality of every moved block.

    python bench/fabric_cpu.py [--reps 10] [--transports socket,tcp,nixl]
"""

import argparse
import multiprocessing as mp
import os
import queue
import socket
import statistics
import time

import torch

from pdserve.bench.common import write_result
from pdserve.kvfabric import FabricIdentity, KVConnectorScheduler, KVReceiver, KVSender

# 16 layers x 64 moved blocks x (K+V of 16 tokens x 8 heads x 64 dims fp32 = 64 KiB) = 64 MiB
CFG = dict(num_layers=16, num_blocks=80, block_size=16, num_kv_heads=8, head_dim=64,
           num_moved=64, seed=3)
TOKEN = "bench-token"


def identity() -> FabricIdentity:
    return FabricIdentity("bench", CFG["block_size"], "float32", CFG["num_layers"],
                          CFG["num_kv_heads"], CFG["head_dim"], 0, "blake2b-64")


def cache(seed: int | None) -> torch.Tensor:
    shape = (CFG["num_layers"], 2, CFG["num_blocks"], CFG["block_size"], CFG["num_kv_heads"],
             CFG["head_dim"])
    if seed is None:
        return torch.zeros(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def plan(rep: int, with_src: bool):
    n = CFG["num_moved"]
    src = list(range(CFG["num_blocks"] - 1, CFG["num_blocks"] - 1 - n, -1))  # reversed order
    dst = list(range(3, 3 + n))
    return KVConnectorScheduler(CFG["num_layers"]).plan(
        f"bench-{rep}", src if with_src else None, dst, 0)


def layer_bytes() -> int:
    return 2 * CFG["num_moved"] * CFG["block_size"] * CFG["num_kv_heads"] * CFG["head_dim"] * 4


def receiver_main(ctl, transport: str) -> None:
    torch.set_num_threads(1)
    kv = cache(None)
    layers = [(kv[i, 0], kv[i, 1]) for i in range(CFG["num_layers"])]
    if transport == "socket":
        listener = socket.create_server(("127.0.0.1", 0))
        ctl.send(f"127.0.0.1:{listener.getsockname()[1]}")
        sock, _ = listener.accept()
        buf = memoryview(bytearray(layer_bytes() * CFG["num_layers"]))
    else:
        done: queue.Queue = queue.Queue()
        receiver = KVReceiver(layers, identity(), TOKEN, transport)
        ctl.send(receiver.address)
    while (msg := ctl.recv())[0] == "expect":
        rep = msg[1]
        if transport == "socket":
            ctl.send("ready")
            got = 0
            while got < len(buf):
                got += sock.recv_into(buf[got:])
            ctl.send(time.monotonic_ns())
            continue
        receiver.expect(plan(rep, False), lambda p, payload: done.put(time.monotonic_ns()),
                        lambda p, reason: done.put(reason), timeout_s=120)
        ctl.send("ready")
        ctl.send(done.get(timeout=180))
    if transport != "socket":  # the last repetition landed exactly?
        ref, p = cache(CFG["seed"]), plan(0, True)
        exact = torch.equal(kv[:, :, list(p.dst_block_ids)], ref[:, :, list(p.src_block_ids)])
        ctl.send((exact, receiver.bytes_received))
        receiver.close()


def sender_main(ctl, transport: str, address: str) -> None:
    torch.set_num_threads(1)
    kv = cache(CFG["seed"])
    layers = [(kv[i, 0], kv[i, 1]) for i in range(CFG["num_layers"])]
    if transport == "socket":
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        payload = memoryview(bytearray(layer_bytes() * CFG["num_layers"]))
        chunks = [payload[i:i + layer_bytes()] for i in range(0, len(payload), layer_bytes())]
    else:
        sender = KVSender(address, TOKEN, identity(), transport)
    while (msg := ctl.recv())[0] == "go":
        t0 = time.monotonic_ns()
        if transport == "socket":
            for chunk in chunks:
                sock.sendall(chunk)
        else:
            p = plan(msg[1], True)
            for i, (k, v) in enumerate(layers):
                sender.send_layer(p, i, k, v)
            sender.finish(p, b"first-token")
        ctl.send(t0)
    ctl.send(0 if transport == "socket" else sender.bytes_sent)


class Pair:
    """A receiver process and a sender process for one transport, connected."""

    def __init__(self, transport: str) -> None:
        ctx = mp.get_context("spawn")
        self.transport = transport
        self.r_ctl, r_child = ctx.Pipe()
        self.s_ctl, s_child = ctx.Pipe()
        self.procs = [ctx.Process(target=receiver_main, args=(r_child, transport))]
        self.procs[0].start()
        address = self.r_ctl.recv()
        self.procs.append(ctx.Process(target=sender_main, args=(s_child, transport, address)))
        self.procs[1].start()
        self.seconds: list[float] = []

    def transfer(self, rep: int) -> float:
        self.r_ctl.send(("expect", rep))
        assert self.r_ctl.recv() == "ready"
        self.s_ctl.send(("go", rep))
        t0, t1 = self.s_ctl.recv(), self.r_ctl.recv()
        if isinstance(t1, str):
            raise RuntimeError(f"{self.transport}: transfer failed: {t1}")
        return (t1 - t0) / 1e9

    def finish(self, reps: int) -> dict:
        self.r_ctl.send(("stop",))
        self.s_ctl.send(("stop",))
        bytes_sent = self.s_ctl.recv()
        exact, bytes_received = (self.r_ctl.recv() if self.transport != "socket"
                                 else (None, None))
        for proc in self.procs:
            proc.join(30)
        nbytes = layer_bytes() * CFG["num_layers"]
        best, median = min(self.seconds), statistics.median(self.seconds)
        per_transfer = lambda n: n // (reps + 1) if n else None
        return dict(nbytes=nbytes, seconds=[round(x, 5) for x in self.seconds],
                    best_bytes_per_s=nbytes / best, median_bytes_per_s=nbytes / median,
                    exact=exact, bytes_sent_per_transfer=per_transfer(bytes_sent),
                    bytes_received_per_transfer=per_transfer(bytes_received))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--transports", default="socket,tcp,nixl")
    args = ap.parse_args()
    pairs = []
    for name in args.transports.split(","):
        try:
            pairs.append(Pair(name))
        except ImportError as e:
            print(f"{name}: skipped ({e})")
    load_before = os.getloadavg()
    for rep in range(args.reps + 1):  # rep 0 warms up; transports alternate every rep
        for pair in pairs:
            seconds = pair.transfer(rep)
            if rep:
                pair.seconds.append(seconds)
    results = {pair.transport: pair.finish(args.reps) for pair in pairs}
    for name, r in results.items():
        print(f"{name:>6}: {r['nbytes'] / 2**20:.0f} MiB  best {r['best_bytes_per_s'] / 1e9:.2f}"
              f" GB/s  median {r['median_bytes_per_s'] / 1e9:.2f} GB/s  exact={r['exact']}")
    ratios = {}
    if "socket" in results:
        base = results["socket"]["median_bytes_per_s"]
        for name, r in results.items():
            if name != "socket":
                ratios[f"{name}_vs_socket_median"] = r["median_bytes_per_s"] / base
                print(f"{name} / plain socket (median): {ratios[f'{name}_vs_socket_median']:.2f}")
    path = write_result("fabric_cpu", dict(
        config=CFG, results=results, ratios=ratios, torch=torch.__version__,
        cpu_model=cpu_model(), tensors="cpu (DRAM)",
        torch_threads_per_process=1, cpu_count=os.cpu_count(),
        loadavg_before=load_before, loadavg_after=os.getloadavg()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
