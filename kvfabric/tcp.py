"""The ``tcp`` data path: pack a layer's blocks, send them once on the side channel.

Sender: ``pack_blocks`` gathers the plan's src blocks of one layer into a
reusable staging tensor ``[2, n, B, Hkv, D]`` (on the KV device; copied to
host for GPU caches), digests each block there (crc32 on the CPU, the wsum
reduction on the GPU), then one ``sendall`` of its memory (no copy in Python).
Receiver: ``LayerStaging`` reads the payload with ``recv_into`` straight into
a preallocated host buffer; the receiver checks the digests on it, and only
then ``unpack_blocks`` scatters it into the KV cache.
"""

import torch

from pdserve.kernels import pack_blocks, unpack_blocks
from pdserve.kvfabric.descriptors import FabricIdentity, TransferPlan
from pdserve.kvfabric.digests import algo_for, as_block_rows, block_digests
from pdserve.kvfabric.faults import flip_byte
from pdserve.kvfabric.frames import TruncatedFrame, recv_exact
from pdserve.kvfabric.layout import as_bytes, torch_dtype
from pdserve.kvfabric.transport import LayerWire, ReceiverPath, SenderPath, Transport


class TcpSenderPath(SenderPath):
    def __init__(self, identity: FabricIdentity) -> None:
        self.identity = identity
        self._staging: torch.Tensor | None = None  # [2, n, B, Hkv, D], grown on demand
        self._host: torch.Tensor | None = None  # host copy for device caches

    def send_layer(self, plan: TransferPlan, layer_idx: int, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, wire: LayerWire) -> int:
        """Pack, digest, then send header + payload. Mutates only the path's staging buffers."""
        n = plan.num_blocks
        shape = (2, n) + tuple(k_cache.shape[1:])
        numel = 2 * n * k_cache[0].numel()
        if (self._staging is None or self._staging.numel() < numel
                or self._staging.device != k_cache.device):
            self._staging = torch.empty(numel, dtype=k_cache.dtype, device=k_cache.device)
        out = self._staging[:numel].view(shape)
        ids = torch.tensor(plan.src_block_ids, dtype=torch.int64, device=k_cache.device)
        pack_blocks(k_cache, v_cache, ids, out=out)
        digests = block_digests(algo_for(out.device), as_block_rows(out, 2 * n))
        bad = wire.block_to_corrupt(plan, layer_idx)
        if bad is not None:  # the knob: our private packed copy, never the cache
            flip_byte(as_block_rows(out, 2 * n), bad)
        if out.device.type != "cpu":
            if self._host is None or self._host.numel() < numel:
                self._host = torch.empty(numel, dtype=out.dtype, pin_memory=True)
            host = self._host[:numel]
            host.copy_(out.reshape(-1))
            out = host
        payload = as_bytes(out)
        wire.send(wire.header(plan, layer_idx, len(payload), digests), payload)
        return len(payload)


class LayerStaging:
    """One connection's receive buffer for layer payloads (host memory, reused)."""

    def __init__(self, identity: FabricIdentity) -> None:
        self.dtype = torch_dtype(identity.dtype)
        self.block_shape = (identity.block_size, identity.num_kv_heads, identity.head_dim)
        self._buf = torch.empty(0, dtype=torch.uint8)

    def read(self, sock, nbytes: int) -> torch.Tensor:
        """Receive ``nbytes`` into the staging buffer; returns a uint8 view of them.

        The view is valid until the next ``read``. Raises TruncatedFrame on close.
        """
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        view = self._buf[:nbytes]
        try:
            recv_exact(sock, memoryview(view.numpy()))
        except EOFError as e:
            raise TruncatedFrame(f"LAYER payload truncated: {e}") from e
        return view

    def unpack(self, raw: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               dst_index: torch.Tensor) -> None:
        """Scatter a received layer into ``dst_index`` blocks. Mutates the caches."""
        buf = raw.view(self.dtype).view((2, dst_index.numel()) + self.block_shape)
        if k_cache.device.type != "cpu":
            buf = buf.to(k_cache.device, non_blocking=False)
        unpack_blocks(buf, k_cache, v_cache, dst_index)


class TcpTransport(Transport):
    name = "tcp"

    def sender_path(self, identity: FabricIdentity) -> TcpSenderPath:
        return TcpSenderPath(identity)

    def receiver_path(self, identity, kv_layers) -> ReceiverPath:
        return ReceiverPath()
