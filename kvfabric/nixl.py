"""The ``nixl`` data path: one-sided NIXL (UCX) WRITEs into the decode side's KV memory.

    prefill KV (registered)          decode KV (registered, addresses in Welcome)
    layer l: K[src_i] --WRITE------> K[dst_i]    one transfer request per layer:
             V[src_i] --WRITE------> V[dst_i]    2n block descriptors, and the
                                                 LAYER header as its notification

The receiver never copies the bytes: NIXL delivers the notification after
the data; the notification carries the layer's per-block digests (taken from
the src blocks before the write is posted), and the receiver checks them
against the landed dst blocks before it counts the layer. Because the writes
are one-sided, a receiver that stops expecting a transfer first sends CANCEL
on the side channel and waits for CANCEL_ACK (the sender acknowledges after
its in-flight writes finished and with no more posted) before it reports the
failure and the blocks can be reused. Works for DRAM (CPU) and VRAM (GPU)
tensors; two agents in one process fall back to slow paths, so use processes.
"""

import os
import threading
import time
import uuid

import numpy as np
import torch

from pdserve.kvfabric.descriptors import FabricIdentity, TransferPlan
from pdserve.kvfabric.digests import algo_for, cache_block_digests
from pdserve.kvfabric.errors import FabricPeerError, FabricTransportUnavailable
from pdserve.kvfabric.faults import flip_digest
from pdserve.kvfabric.frames import Welcome
from pdserve.kvfabric.transport import LayerWire, ReceiverPath, SenderPath, Transport

WRITE_TIMEOUT_S = 60.0


def _mem(t: torch.Tensor) -> tuple[str, int]:
    """(NIXL memory type, device id) of a tensor."""
    return ("VRAM", t.device.index or 0) if t.device.type == "cuda" else ("DRAM", 0)


class NixlTransport(Transport):
    """Owns one NIXL agent (created on first use) and the memory registered with it.

    Thread-safe: the agent runs in NIXL's strict thread-sync mode.
    """

    name = "nixl"

    def __init__(self) -> None:
        try:
            from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
        except ImportError as e:
            raise FabricTransportUnavailable(
                f"the 'nixl' KV transport needs the 'nixl' package (pip install nixl): {e}"
            ) from e
        self._make = lambda name: nixl_agent(name, nixl_agent_config(
            enable_prog_thread=False,
            backends=["UCX"], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT))
        self._agent = None
        self._lock = threading.Lock()
        self._registered: dict[tuple[int, int], object] = {}  # (addr, nbytes) -> reg descs
        self._progress = threading.Condition()
        self._inflight: set = set()  # posted writes the progress thread drives
        self._progress_thread: threading.Thread | None = None
        self._closed = False

    @property
    def agent(self):
        """The process's agent for this transport (created on first use)."""
        with self._lock:
            if self._agent is None:
                self._agent = self._make(f"pdkv-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            return self._agent

    def register(self, t: torch.Tensor) -> None:
        """Register a contiguous tensor's memory once. Mutates the agent's registrations."""
        if not t.is_contiguous():
            raise ValueError("NIXL registration needs contiguous KV tensors")
        key = (t.data_ptr(), t.nbytes)
        agent = self.agent
        with self._lock:
            if key not in self._registered:
                mem_type, dev = _mem(t)
                self._registered[key] = agent.register_memory(
                    [(t.data_ptr(), t.nbytes, dev, "")], mem_type)

    def track(self, handle) -> None:
        """Drive a posted write to completion in the background.

        A UCX write's notification leaves only when the initiator progresses
        it; without this, layer notifications would wait for ``finish``.
        """
        with self._progress:
            self._inflight.add(handle)
            if self._progress_thread is None:
                self._progress_thread = threading.Thread(
                    target=self._progress_loop, daemon=True, name="kvfabric-nixl-progress")
                self._progress_thread.start()
            self._progress.notify()

    def untrack(self, handle) -> None:
        """Stop driving ``handle``; after this the caller may release it."""
        with self._progress:
            self._inflight.discard(handle)

    def _progress_loop(self) -> None:
        while True:
            with self._progress:
                while not self._inflight and not self._closed:
                    self._progress.wait()
                if self._closed:
                    return
                for handle in list(self._inflight):
                    if self._agent.check_xfer_state(handle) != "PROC":
                        self._inflight.discard(handle)
            time.sleep(0.0002)

    def close(self) -> None:
        """Deregister everything. The transport must not be used afterwards."""
        with self._progress:
            self._closed = True
            self._progress.notify()
        with self._lock:
            for descs in self._registered.values():
                self._agent.deregister_memory(descs)
            self._registered.clear()

    def sender_path(self, identity: FabricIdentity) -> "NixlSenderPath":
        return NixlSenderPath(self, identity)

    def receiver_path(self, identity, kv_layers) -> "NixlReceiverPath":
        return NixlReceiverPath(self, kv_layers)


class NixlSenderPath(SenderPath):
    one_sided = True

    def __init__(self, transport: NixlTransport, identity: FabricIdentity) -> None:
        self.transport = transport
        self.identity = identity
        self.agent_name = transport.agent.name
        self._remote: str | None = None
        self._welcome: Welcome | None = None
        self._writes: dict[str, list] = {}  # transfer_id -> xfer handles in flight

    def attach(self, welcome: Welcome) -> None:
        """Load the receiver's agent metadata. Mutates the agent's remote table."""
        if len(welcome.layer_addrs) != self.identity.num_layers:
            raise FabricPeerError(f"receiver offered {len(welcome.layer_addrs)} layers")
        name = self.transport.agent.add_remote_agent(welcome.agent_metadata)
        self._remote = name.decode() if isinstance(name, bytes) else name
        self._welcome = welcome

    def send_layer(self, plan: TransferPlan, layer_idx: int, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, wire: LayerWire) -> int:
        """Digest the layer's src blocks, post one WRITE of them; returns at once.

        The src blocks must stay unchanged until ``wait_writes`` of this transfer.
        """
        w = self._welcome
        if max(plan.dst_block_ids) >= w.num_blocks:
            raise ValueError(f"plan {plan.transfer_id}: dst block {max(plan.dst_block_ids)} "
                             f">= receiver's {w.num_blocks} blocks")
        agent = self.transport.agent
        self.transport.register(k_cache)
        self.transport.register(v_cache)
        blk = self.identity.bytes_per_block
        src = np.asarray(plan.src_block_ids, dtype=np.uint64) * blk
        dst = np.asarray(plan.dst_block_ids, dtype=np.uint64) * blk
        mem_type, dev = _mem(k_cache)
        rk, rv = w.layer_addrs[layer_idx]
        src, dst, lengths = _coalesce(src, dst, blk)
        local = _descs([k_cache.data_ptr() + src, v_cache.data_ptr() + src], lengths, dev)
        remote = _descs([rk + dst, rv + dst], lengths, w.device_id)
        nbytes = 2 * plan.num_blocks * blk
        src_ids = torch.tensor(plan.src_block_ids, dtype=torch.int64, device=k_cache.device)
        digests = cache_block_digests(algo_for(k_cache.device), k_cache, v_cache, src_ids)
        bad = wire.block_to_corrupt(plan, layer_idx)
        if bad is not None:  # the knob: the writes read the cache itself, so lie in the digest
            digests = flip_digest(digests, bad)
        handle = agent.initialize_xfer(
            "WRITE", agent.get_xfer_descs(local, mem_type),
            agent.get_xfer_descs(remote, w.mem_type), self._remote,
            wire.header(plan, layer_idx, nbytes, digests))
        if agent.transfer(handle) == "ERR":
            handle.release()
            raise FabricPeerError(f"NIXL write of layer {layer_idx} of {plan.transfer_id} failed")
        self._writes.setdefault(plan.transfer_id, []).append(handle)
        self.transport.track(handle)
        return nbytes

    def take_writes(self, transfer_id: str) -> list:
        return self._writes.pop(transfer_id, [])

    def wait_writes(self, writes: list) -> None:
        """Poll until every write is done, releasing each. Raises FabricPeerError."""
        agent = self.transport.agent
        deadline = time.monotonic() + WRITE_TIMEOUT_S
        failed = None
        for handle in writes:
            self.transport.untrack(handle)
            state = agent.check_xfer_state(handle)
            while state == "PROC" and time.monotonic() < deadline:
                time.sleep(0.0002)
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                failed = failed or f"NIXL write ended in state {state}"
            else:
                handle.release()
        if failed:
            raise FabricPeerError(failed)

    def close(self) -> None:
        self.drain_writes(self._writes)
        if self._remote is not None:
            self.transport.agent.remove_remote_agent(self._remote)
            self._remote = None


def _coalesce(src: np.ndarray, dst: np.ndarray,
              blk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge blocks that are consecutive on both sides into runs. Pure.

    src/dst: byte offsets of the blocks, pairwise. Returns (src starts, dst
    starts, run lengths in bytes): one descriptor per run instead of per block
    (a fresh pool's blocks are mostly consecutive; UCX pays per descriptor).
    """
    if src.size == 0:
        return src, dst, src
    step = np.uint64(blk)
    cut = np.flatnonzero((src[1:] != src[:-1] + step) | (dst[1:] != dst[:-1] + step)) + 1
    starts = np.concatenate([[0], cut])
    counts = np.diff(np.concatenate([starts, [src.size]]))
    return src[starts], dst[starts], counts.astype(np.uint64) * step


def _descs(addr_runs: list[np.ndarray], lengths: np.ndarray, dev: int) -> np.ndarray:
    """Nx3 (addr, len, dev) rows, the runs one after the other (each with ``lengths``). Pure."""
    addrs = np.concatenate(addr_runs)
    out = np.empty((addrs.size, 3), dtype=np.uint64)
    out[:, 0] = addrs
    out[:, 1] = np.tile(lengths, len(addr_runs))
    out[:, 2] = dev
    return out


class NixlReceiverPath(ReceiverPath):
    """Registers the decode KV cache and offers its layer addresses in the Welcome."""

    def __init__(self, transport: NixlTransport, kv_layers) -> None:
        self.transport = transport
        for k, v in kv_layers:
            transport.register(k)
            transport.register(v)
        self._mem_type, self._dev = _mem(kv_layers[0][0])
        self._layer_addrs = [(k.data_ptr(), v.data_ptr()) for k, v in kv_layers]
        self._metadata = transport.agent.get_agent_metadata()

    def welcome_fields(self) -> dict:
        return {"agent_metadata": self._metadata, "mem_type": self._mem_type,
                "device_id": self._dev, "layer_addrs": self._layer_addrs}

    @property
    def has_notifications(self) -> bool:
        return True

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        notifs = self.transport.agent.get_new_notifs()
        return [(str(agent), msg) for agent, msgs in notifs.items() for msg in msgs]
