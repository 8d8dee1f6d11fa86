"""The ``cuda_ipc`` data path: the prefill side copies blocks straight into the decode
side's KV memory, mapped into its own process by CUDA IPC (workers on one host).

    decode (receiver path)                       prefill (sender path)
    export the KV allocation(s)  --Welcome--->   open them (UntypedStorage._new_shared_cuda)
    (host id, IPC handles, per-layer offsets)    views [NB, B, Hkv, D] per layer, K and V
                                                 send_layer: copy_blocks(src ids -> dst ids)
                                                   + block checksums of the src blocks,
                                                   both on the caller's stream, no host sync
                            <--FINISH----------  finish: wait for the copies, then FINISH
    check every layer's digests on the           whose aux carries every layer's digests
    dst blocks (one sync), count all layers      (sealed with the header and payload)

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

import torch

from pdserve.kernels import copy_blocks
from pdserve.kernels.ops import block_checksums
from pdserve.kvfabric.descriptors import FabricIdentity, TransferPlan
from pdserve.kvfabric.digests import ALGO_WSUM, BlockDigests
from pdserve.kvfabric.errors import FabricHandshakeError, FabricTransportUnavailable
from pdserve.kvfabric.faults import flip_digest
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
    """One transfer's copies in flight: the block ids on the device, an event per layer
    copy, and the layers' src checksums (device tensors until ``finish_digests``)."""

    src_ids: torch.Tensor
    dst_ids: torch.Tensor
    events: list = field(default_factory=list)
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    corrupt: dict[int, int] = field(default_factory=dict)  # layer -> block (fault knob)


class CudaIpcSenderPath(SenderPath):
    """Maps the receiver's KV and copies into it. Safe from one thread at a time (the
    KVSender's lock orders ``send_layer`` against cancels)."""

    one_sided = True
    digests_at_finish = True

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
        if max(plan.dst_block_ids) >= self._num_blocks:
            raise ValueError(f"plan {plan.transfer_id}: dst block {max(plan.dst_block_ids)} "
                             f">= receiver's {self._num_blocks} blocks")
        out = self._outgoing.get(plan.transfer_id)
        if out is None:
            dev = k_cache.device
            out = self._outgoing[plan.transfer_id] = _Outgoing(
                torch.tensor(plan.src_block_ids, dtype=torch.int64).to(dev, non_blocking=True),
                torch.tensor(plan.dst_block_ids, dtype=torch.int64).to(dev, non_blocking=True))
        rk, rv = self._layers[layer_idx]
        copy_blocks(k_cache, v_cache, out.src_ids, rk, rv, out.dst_ids)
        out.sums[layer_idx] = block_checksums(k_cache, v_cache, out.src_ids)
        bad = wire.block_to_corrupt(plan, layer_idx)
        if bad is not None:  # the knob: the copy reads the cache itself, so lie in the digest
            out.corrupt[layer_idx] = bad
        event = torch.cuda.Event()
        event.record()
        out.events.append(event)
        return 2 * plan.num_blocks * self.identity.bytes_per_block

    def take_writes(self, transfer_id: str) -> list:
        out = self._outgoing.pop(transfer_id, None)
        return [] if out is None else [out]

    def wait_writes(self, writes: list) -> None:
        for out in writes:
            for event in out.events:
                event.synchronize()

    def finish_digests(self, plan: TransferPlan, writes: list) -> list[BlockDigests]:
        """Every layer's src block digests (layer order), once ``writes`` are waited for.
        Raises ValueError if a layer was not sent. Pure but for one device-to-host copy."""
        if plan.num_blocks == 0:
            return [BlockDigests(ALGO_WSUM, ()) for _ in range(plan.num_layers)]
        sums = writes[0].sums if writes else {}
        missing = [i for i in range(plan.num_layers) if i not in sums]
        if missing:
            raise ValueError(f"transfer {plan.transfer_id}: finish before layers {missing} "
                             f"were sent")
        flat = torch.cat([sums[i] for i in range(plan.num_layers)]).tolist()
        per = 2 * plan.num_blocks
        layers = [BlockDigests(ALGO_WSUM, tuple(flat[i * per:(i + 1) * per]))
                  for i in range(plan.num_layers)]
        for layer, bad in writes[0].corrupt.items():
            layers[layer] = flip_digest(layers[layer], bad)
        return layers

    def close(self) -> None:
        self.drain_writes({k: [v] for k, v in self._outgoing.items()})
        self._outgoing.clear()
        self._layers = []
        self._storages = []  # the mappings close with their last reference
