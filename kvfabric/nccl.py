"""The ``nccl`` data path: a 2-rank torch.distributed group per (prefill, decode) pair.

    decode (receiver path)                      prefill (sender path)
    TCPStore master on host:port  --Welcome-->  attach: store client, "pairK/agent"
    pair thread: group rank 1    <==========>   group rank 0 (PrefixStore "pairK/")
      recv meta [op, hlen, n, layer]    <--     send meta
      recv LAYER header + digests       <--     send header (as a NIXL notification)
      recv dst block ids [n]            <--     send dst ids
      recv packed layer [2, n, B, H, D] <--     pack_blocks(src ids) + send
      unpack_blocks into dst, then the header becomes a notification for the table,
      which checks the block digests against the landed dst blocks

The rendezvous (store address, pair number, backend) travels in the Welcome's
``agent_metadata`` on the fabric's side channel, which is also where HELLO,
FINISH, ABORT and CANCEL keep travelling. The backend follows the decode KV
device: ``nccl`` for CUDA tensors, ``gloo`` for CPU tensors (CI runs this very
code on gloo). NCCL refuses two ranks on one GPU, so on a one-GPU box use
``nixl``; ``nccl`` needs the two workers on different GPUs.

From the table's point of view the path is one-sided like nixl: the data lands
in the dst blocks before the table counts the LAYER notification. A CANCEL is
therefore drained: ``wait_writes`` waits for the posted sends and then for a
SYNC round trip, which the pair thread answers only after every earlier layer
is unpacked (and the device synchronised).
"""

import datetime
import json
import os
import threading
import uuid
from collections import deque

import torch
import torch.distributed as dist

from pdserve.kernels import pack_blocks, unpack_blocks
from pdserve.kvfabric.descriptors import FabricIdentity, TransferPlan
from pdserve.kvfabric.digests import algo_for, as_block_rows, block_digests, layer_aux_size
from pdserve.kvfabric.errors import FabricPeerError, FabricTransportUnavailable
from pdserve.kvfabric.faults import flip_byte
from pdserve.kvfabric.frames import HEADER_SIZE, LAYER, ProtocolError, Welcome, parse_notification
from pdserve.kvfabric.layout import torch_dtype
from pdserve.kvfabric.transport import LayerWire, ReceiverPath, SenderPath, Transport

OP_LAYER, OP_SYNC, OP_CLOSE = 1, 2, 3
TAG = 0
IDLE_TIMEOUT = datetime.timedelta(days=1)  # a pair waits this long for its next layer
WAIT_TIMEOUT = datetime.timedelta(seconds=60)  # a posted send must finish within this
MAX_IDS_BYTES = 510  # transfer id + request id


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA tensors, ``gloo`` for CPU tensors. Pure."""
    return "nccl" if device.type == "cuda" else "gloo"


def make_pair_group(backend: str, store, rank: int):
    """A 2-rank process group on ``store`` (no default group needed, so one
    process can hold many pairs). Blocks (gloo) until both ranks joined."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, IDLE_TIMEOUT)
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise FabricTransportUnavailable("this torch build has no NCCL")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = IDLE_TIMEOUT
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    raise ValueError(f"unknown torch.distributed backend {backend!r}")


class NcclTransport(Transport):
    """Pairwise torch.distributed groups. ``backend``: force "gloo"/"nccl" (default:
    from the decode KV device). ``host``: where the decode side's TCPStore listens."""

    name = "nccl"

    def __init__(self, backend: str | None = None, host: str = "127.0.0.1") -> None:
        if not dist.is_available():
            raise FabricTransportUnavailable("the 'nccl' KV transport needs torch.distributed")
        self.backend = backend
        self.host = host

    def sender_path(self, identity: FabricIdentity) -> "NcclSenderPath":
        return NcclSenderPath(identity)

    def receiver_path(self, identity, kv_layers) -> "NcclReceiverPath":
        return NcclReceiverPath(identity, kv_layers, self.backend, self.host)


class NcclSenderPath(SenderPath):
    """Rank 0 of one pair group. Thread-safe: one lock orders every message of the pair."""

    one_sided = True

    def __init__(self, identity: FabricIdentity) -> None:
        self.identity = identity
        self.agent_name = f"nccl-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.backend = ""
        self._store = None
        self._group = None
        self._lock = threading.Lock()
        self._writes: dict[str, list] = {}  # transfer_id -> [(works, tensors kept alive)]
        self._num_blocks = 0

    def attach(self, welcome: Welcome) -> None:
        """Join the receiver's pair group (blocks until it joined). Raises FabricPeerError."""
        try:
            info = json.loads(welcome.agent_metadata)
            host, port = info["store"].rsplit(":", 1)
            self.backend = info["backend"]
            self._store = dist.TCPStore(host, int(port), is_master=False,
                                        timeout=datetime.timedelta(seconds=10))
            prefix = dist.PrefixStore(f"pair{int(info['pair'])}/", self._store)
            prefix.set("agent", self.agent_name)
            self._group = make_pair_group(self.backend, prefix, rank=0)
        except (ValueError, KeyError, RuntimeError) as e:
            raise FabricPeerError(f"cannot join the receiver's {self.backend or 'pair'} "
                                  f"group: {e}") from e
        self._num_blocks = welcome.num_blocks

    def send_layer(self, plan: TransferPlan, layer_idx: int, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, wire: LayerWire) -> int:
        """Pack the layer's src blocks and post its four sends; returns at once.

        The packed copy is private, so the src blocks may change right after
        the pack (stream-ordered on GPUs). Raises FabricPeerError, ValueError.
        """
        dev = k_cache.device
        if backend_for(dev) != self.backend:
            raise ValueError(f"{self.backend} pair group cannot send {dev.type} KV")
        if max(plan.dst_block_ids) >= self._num_blocks:
            raise ValueError(f"plan {plan.transfer_id}: dst block {max(plan.dst_block_ids)} "
                             f">= receiver's {self._num_blocks} blocks")
        n = plan.num_blocks
        nbytes = 2 * n * self.identity.bytes_per_block
        dst = torch.tensor(plan.dst_block_ids, dtype=torch.int64)
        src = torch.tensor(plan.src_block_ids, dtype=torch.int64).to(dev, non_blocking=True)
        packed = torch.empty((2, n) + tuple(k_cache.shape[1:]), dtype=k_cache.dtype, device=dev)
        pack_blocks(k_cache, v_cache, src, out=packed)  # [2, n, B, Hkv, D]
        digests = block_digests(algo_for(dev), as_block_rows(packed, 2 * n))
        bad = wire.block_to_corrupt(plan, layer_idx)
        if bad is not None:  # the knob: our private packed copy, never the cache
            flip_byte(as_block_rows(packed, 2 * n), bad)
        header = wire.header(plan, layer_idx, nbytes, digests)
        meta = torch.tensor([OP_LAYER, len(header), n, layer_idx], dtype=torch.int64)
        hdr = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        tensors = [t.to(dev, non_blocking=True) for t in (meta, hdr, dst)] + [packed]
        with self._lock:
            try:
                works = [self._group.send([t], 1, TAG) for t in tensors]
            except RuntimeError as e:
                raise FabricPeerError(f"{self.backend} send of layer {layer_idx} of "
                                      f"{plan.transfer_id} failed: {e}") from e
            self._writes.setdefault(plan.transfer_id, []).append((works, tensors))
        return nbytes

    def take_writes(self, transfer_id: str) -> list:
        with self._lock:
            return self._writes.pop(transfer_id, [])

    def wait_writes(self, writes: list) -> None:
        """Wait for the sends, then for the receiver to have unpacked them (SYNC round trip)."""
        if not writes:
            return
        try:
            for works, _ in writes:
                for w in works:
                    w.wait(WAIT_TIMEOUT)
            with self._lock:
                dev = writes[0][1][-1].device
                meta = torch.tensor([OP_SYNC, 0, 0, 0], dtype=torch.int64).to(dev)
                self._group.send([meta], 1, TAG).wait(WAIT_TIMEOUT)
                self._group.recv([meta], 1, TAG).wait(WAIT_TIMEOUT)
        except RuntimeError as e:
            raise FabricPeerError(f"{self.backend} pair group failed: {e}") from e

    def close(self) -> None:
        """Tell the pair thread to stop (best effort) and drop the group. Idempotent."""
        if self._group is None:
            return
        self.drain_writes(self._writes)
        try:
            dev = torch.device("cuda") if self.backend == "nccl" else torch.device("cpu")
            meta = torch.tensor([OP_CLOSE, 0, 0, 0], dtype=torch.int64).to(dev)
            self._group.send([meta], 1, TAG).wait(datetime.timedelta(seconds=5))
        except RuntimeError:
            pass
        self._group = None
        self._store = None


class NcclReceiverPath(ReceiverPath):
    """Hosts the rendezvous store; one thread per prefill peer (pair) lands its layers."""

    def __init__(self, identity: FabricIdentity, kv_layers, backend: str | None,
                 host: str) -> None:
        self.identity = identity
        self.kv_layers = kv_layers
        self.device = kv_layers[0][0].device
        self.backend = backend or backend_for(self.device)
        self._host = host
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=30))
        self._lock = threading.Lock()
        self._num_pairs = 0
        self._notes: deque[tuple[str, bytes]] = deque()
        self._closed = False
        self.pair_errors: list[str] = []  # why pair threads ended, for logs and tests

    def welcome_fields(self) -> dict:
        """Open a new pair (its thread joins the group) and describe it. Mutates the path."""
        with self._lock:
            pair = self._num_pairs
            self._num_pairs += 1
        threading.Thread(target=self._serve_pair, args=(pair,), daemon=True,
                         name=f"kvrecv-nccl-pair{pair}").start()
        info = {"store": f"{self._host}:{self._store.port}", "pair": pair,
                "backend": self.backend}
        mem_type = "VRAM" if self.device.type == "cuda" else "DRAM"
        return {"agent_metadata": json.dumps(info).encode(), "mem_type": mem_type,
                "device_id": self.device.index or 0}

    @property
    def has_notifications(self) -> bool:
        return True

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        out = []
        while self._notes:
            out.append(self._notes.popleft())
        return out

    def close(self) -> None:
        self._closed = True

    def _serve_pair(self, pair: int) -> None:
        prefix = dist.PrefixStore(f"pair{pair}/", self._store)
        try:
            agent = prefix.get("agent").decode()
            group = make_pair_group(self.backend, prefix, rank=1)
            while not self._closed and self._serve_one(group, agent):
                pass
        except (RuntimeError, ProtocolError, ValueError) as e:
            self.pair_errors.append(f"pair {pair}: {e}")

    def _recv(self, group, t: torch.Tensor) -> torch.Tensor:
        group.recv([t], 0, TAG).wait()
        return t

    def _serve_one(self, group, agent: str) -> bool:
        """Handle one message sequence; False when the sender closed the pair."""
        dev, i = self.device, self.identity
        op, hlen, n, layer = self._recv(group, torch.empty(4, dtype=torch.int64,
                                                           device=dev)).tolist()
        if op == OP_CLOSE:
            return False
        if op == OP_SYNC:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            group.send([torch.zeros(4, dtype=torch.int64, device=dev)], 0, TAG).wait()
            return True
        num_blocks = self.kv_layers[0][0].shape[0]
        max_header = HEADER_SIZE + MAX_IDS_BYTES + layer_aux_size(n)
        if op != OP_LAYER or not (0 < hlen <= max_header and 0 < n <= num_blocks
                                  and 0 <= layer < len(self.kv_layers)):
            raise ProtocolError(f"bad pair message {[op, hlen, n, layer]}")
        header = bytes(self._recv(group, torch.empty(hlen, dtype=torch.uint8, device=dev))
                       .cpu().numpy())
        dst = self._recv(group, torch.empty(n, dtype=torch.int64, device=dev))
        packed = torch.empty((2, n, i.block_size, i.num_kv_heads, i.head_dim),
                             dtype=torch_dtype(i.dtype), device=dev)
        self._recv(group, packed)
        h, _ = parse_notification(header)
        if h.kind != LAYER or h.layer != layer or h.nbytes != packed.nbytes:
            raise ProtocolError(f"pair header {h} does not describe the payload")
        if int(dst.min()) < 0 or int(dst.max()) >= num_blocks:
            raise ProtocolError(f"dst blocks out of range 0..{num_blocks - 1}")
        k_cache, v_cache = self.kv_layers[layer]
        unpack_blocks(packed, k_cache, v_cache, dst)
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
        self._notes.append((agent, header))
        return True
