"""The ``cuda_ipc`` data path: the prefill side copies blocks straight into the decode
side's KV memory, mapped into its own process by CUDA IPC (workers on one host).

    decode (receiver path)                       prefill (sender path)
    export the KV allocation(s)  --Welcome--->   open them (UntypedStorage._new_shared_cuda)
    (host id, IPC handles, per-layer offsets)    views [NB, B, Hkv, D] per layer, K and V
                                                 send_layer: one kernel copies the blocks
                                                   (src ids -> dst ids) and checksums what it
                                                   read, on the caller's stream, no host sync
                                                 (send_layers: every layer, one launch)
                            <--FINISH----------  finish: wait for the copies, then FINISH
    check every layer's digests on the           whose aux carries every layer's digests
    dst blocks (one launch, compared on the      (sealed with the header and payload)
    GPU, one sync), count all layers

No frame travels per layer: a layer is one copy kernel (read + write of its
blocks at device copy speed), so the whole prompt's KV moves in well under a
millisecond on one GPU. The receiver learns that the data landed only from
FINISH, which leaves after the sender's stream finished the copies; it then
reads the landed blocks once to check them, so a copy that wrote the wrong
place, or a block changed under the copy, fails the transfer.

Like nixl the writes are one-sided: a receiver that stops expecting a
transfer sends CANCEL and waits for CANCEL_ACK, which the sender sends once
the transfer's copies finished (``wait_writes``). IPC handles name memory on
this host only; the Welcome carries the receiver's host id, and a sender on
another host is refused at the handshake with a message saying so.
"""

import os
import socket
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch

from pdserve.kernels.ops import copy_blocks_checksums
from pdserve.kvfabric.descriptors import FabricIdentity, TransferPlan
from pdserve.kvfabric.digests import ALGO_WSUM
from pdserve.kvfabric.errors import FabricHandshakeError, FabricTransportUnavailable
from pdserve.kvfabric.frames import IpcStorage, Welcome
from pdserve.kvfabric.layout import torch_dtype
from pdserve.kvfabric.transport import LayerWire, ReceiverPath, SenderPath, Transport


@cache
def host_id() -> str:
    """This host's identity for IPC: hostname and boot id (a container shares the boot id
    of its host, and a reboot invalidates every handle). Pure after the first call."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class CudaIpcTransport(Transport):
    """Same-host GPU-to-GPU copies through CUDA IPC mappings; digests travel in FINISH."""

    name = "cuda_ipc"
    digests_at_finish = True

    def sender_path(self, identity: FabricIdentity) -> "CudaIpcSenderPath":
        return CudaIpcSenderPath(identity)

    def receiver_path(self, identity, kv_layers) -> "CudaIpcReceiverPath":
        return CudaIpcReceiverPath(kv_layers)


def _require_cuda(t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise FabricTransportUnavailable(
            f"the 'cuda_ipc' KV transport needs the KV cache in GPU memory, not {t.device}")


class CudaIpcReceiverPath(ReceiverPath):
    """Exports the KV cache's allocations once; offers them in every Welcome."""

    def __init__(self, kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        _require_cuda(kv_layers[0][0])
        index: dict[int, int] = {}  # storage data_ptr -> position in storages
        self._storages: list[IpcStorage] = []
        self._layers: list[tuple[int, int, int, int]] = []
        for k, v in kv_layers:
            row: list[int] = []
            for t in (k, v):
                st = t.untyped_storage()
                if st.data_ptr() not in index:
                    index[st.data_ptr()] = len(self._storages)
                    self._storages.append(IpcStorage(*st._share_cuda_()))
                row += [index[st.data_ptr()], t.data_ptr() - st.data_ptr()]
            self._layers.append(tuple(row))

    def welcome_fields(self) -> dict:
        return {"host_id": host_id(), "ipc_storages": self._storages,
                "ipc_layers": self._layers}


@dataclass
class _Outgoing:
    """One transfer's copies in flight: the block ids on the device, (stream, event) per
    launch, and the layers' src checksums (device tensors until ``finish_digests``)."""

    src_ids: torch.Tensor
    dst_ids: torch.Tensor
    events: list = field(default_factory=list)
    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # per layer [2n]
    all_sums: torch.Tensor | None = None  # [L, 2n], from send_layers
    corrupt: dict[int, int] = field(default_factory=dict)  # layer -> block (fault knob)


class CudaIpcSenderPath(SenderPath):
    """Maps the receiver's KV and copies into it. Safe from one thread at a time (the
    KVSender's lock orders ``send_layer`` against cancels)."""

    one_sided = True
    digests_at_finish = True
    stream_ordered = True

    def __init__(self, identity: FabricIdentity) -> None:
        self.identity = identity
        self.agent_name = f"cuda_ipc-{os.getpid()}"
        self._storages: list[torch.UntypedStorage] = []
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._outgoing: dict[str, _Outgoing] = {}
        self._num_blocks = 0

    def attach(self, welcome: Welcome) -> None:
        """Open the receiver's exported KV memory. Raises FabricHandshakeError."""
        if welcome.host_id != host_id():
            raise FabricHandshakeError(
                f"the 'cuda_ipc' KV transport needs both workers on one host: the receiver "
                f"is on {welcome.host_id or 'an unknown host'}, this worker on {host_id()}")
        if len(welcome.ipc_layers) != self.identity.num_layers:
            raise FabricHandshakeError(f"receiver offered {len(welcome.ipc_layers)} layers, "
                                       f"identity has {self.identity.num_layers}")
        try:
            torch.cuda.init()
            self._storages = [torch.UntypedStorage._new_shared_cuda(
                s.device, s.handle, s.size, s.offset, s.ref_counter_handle,
                s.ref_counter_offset, s.event_handle, s.event_sync_required)
                for s in welcome.ipc_storages]
        except (RuntimeError, TypeError) as e:
            raise FabricHandshakeError(f"cannot open the receiver's CUDA IPC memory: {e}") from e
        i, nb = self.identity, welcome.num_blocks
        shape = (nb, i.block_size, i.num_kv_heads, i.head_dim)
        dtype = torch_dtype(i.dtype)
        nbytes = nb * i.bytes_per_block

        def view(storage_idx: int, offset: int) -> torch.Tensor:
            st = self._storages[storage_idx]
            if offset < 0 or offset + nbytes > st.nbytes():
                raise FabricHandshakeError(f"receiver's layer at byte {offset} of {nbytes} "
                                           f"lies outside its {st.nbytes()}-byte allocation")
            flat = torch.empty(0, dtype=torch.uint8, device=st.device).set_(st)
            return flat[offset:offset + nbytes].view(dtype).view(shape)

        self._layers = [(view(ks, ko), view(vs, vo)) for ks, ko, vs, vo in welcome.ipc_layers]
        self._num_blocks = nb

    def send_layer(self, plan: TransferPlan, layer_idx: int, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, wire: LayerWire) -> int:
        """Launch the copy of the layer's blocks and their checksums on the current stream;
        returns at once. The src blocks must stay unchanged until ``wait_writes``."""
        out = self._outgoing_for(plan, k_cache.device)
        out.sums[layer_idx] = copy_blocks_checksums(
            [(k_cache, v_cache)], out.src_ids, [self._layers[layer_idx]], out.dst_ids)[0]
        self._after_launch(out, plan, [layer_idx], wire)
        return 2 * plan.num_blocks * self.identity.bytes_per_block

    def send_layers(self, plan: TransferPlan, kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
                    wire: LayerWire) -> int:
        """Every layer at once (KV computed earlier): one copy launch and one checksum
        launch for an engine's KV cache. Same contract as ``send_layer``."""
        out = self._outgoing_for(plan, kv_layers[0][0].device)
        out.all_sums = copy_blocks_checksums(kv_layers, out.src_ids, self._layers, out.dst_ids)
        self._after_launch(out, plan, list(range(len(kv_layers))), wire)
        return 2 * plan.num_blocks * self.identity.bytes_per_block * len(kv_layers)

    def _outgoing_for(self, plan: TransferPlan, device: torch.device) -> "_Outgoing":
        """The transfer's state, made (and its dst ids checked) at its first send."""
        out = self._outgoing.get(plan.transfer_id)
        if out is None and max(plan.dst_block_ids) >= self._num_blocks:
            raise ValueError(f"plan {plan.transfer_id}: dst block {max(plan.dst_block_ids)} "
                             f">= receiver's {self._num_blocks} blocks")
        if out is None:  # ids go up from pinned memory without the host waiting for the
            # stream (a pageable copy would wait for the layer being computed)
            ids = torch.tensor([plan.src_block_ids, plan.dst_block_ids], dtype=torch.int64)
            ids = ids.pin_memory().to(device, non_blocking=True)
            out = self._outgoing[plan.transfer_id] = _Outgoing(ids[0], ids[1])
        return out

    def _after_launch(self, out: "_Outgoing", plan: TransferPlan, layers: list[int],
                      wire: LayerWire) -> None:
        for layer in layers:
            bad = wire.block_to_corrupt(plan, layer)
            if bad is not None:  # the knob: the copy reads the cache itself, so lie in the digest
                out.corrupt[layer] = bad
        stream = torch.cuda.current_stream()
        event = torch.cuda.Event()
        event.record(stream)
        out.events.append((stream, event))

    def take_writes(self, transfer_id: str) -> list:
        out = self._outgoing.pop(transfer_id, None)
        return [] if out is None else [out]

    def wait_writes(self, writes: list) -> None:
        """Block until the transfers' copies finished: the last event of each stream
        they were launched on (a stream runs its work in order)."""
        for out in writes:
            for event in {stream: event for stream, event in out.events}.values():
                event.synchronize()

    def finish_digests(self, plan: TransferPlan, writes: list) -> tuple[int, np.ndarray]:
        """(ALGO_WSUM, ``[num_layers, 2n]``) src block digests, once ``writes`` are waited
        for; no digests at all when a layer was not sent (the receiver then fails the
        transfer naming the count). One device-to-host copy."""
        out = writes[0] if writes else None
        if plan.num_blocks == 0 or out is None:
            return ALGO_WSUM, np.zeros((0,), dtype=np.uint32)
        if out.all_sums is not None:
            sums = out.all_sums
        elif len(out.sums) == plan.num_layers:
            sums = torch.stack([out.sums[i] for i in range(plan.num_layers)])
        else:
            return ALGO_WSUM, np.zeros((0,), dtype=np.uint32)
        values = sums.cpu().numpy().astype(np.uint32)  # [L, 2n], each < 2**31
        for layer, bad in out.corrupt.items():
            values[layer, bad] ^= 1
        return ALGO_WSUM, values

    def close(self) -> None:
        self.drain_writes({k: [v] for k, v in self._outgoing.items()})
        self._outgoing.clear()
        self._layers = []
        self._storages = []  # the mappings close with their last reference
