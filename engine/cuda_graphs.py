"""CUDA graphs for pure-decode steps, one per bucketed batch size.

A decode step of a small batch is hundreds of short launches; replaying a
captured graph removes their host cost. Shapes must be static, so a step of
``n`` decodes runs the graph of the smallest bucket ``b >= n`` with rows
``n .. b-1`` padded, and every bucket's block table has the same width
(``max_blocks``: enough for ``max_model_len``). The decode kernel's launch
depends on shapes only, so it needs no host sync and captures as is.

All inputs of bucket ``b`` live in one int32 device buffer, filled by one
copy from a pinned host buffer of the same layout::

    [ input_ids b | positions b | slot_mapping b | context_lens b | tables b x M ]

There are two pinned host buffers, used in turn: the host fills one while the
copy out of the other may still be queued behind the step running on the GPU
(``host_views`` waits for a buffer's last copy before handing it out again).
A lookahead step (``replay(..., feed=...)``) writes in ``input_ids`` rows of
``feed`` (the previous step's sampled ids, on the device); after the copy the
device replaces each row number with ``feed[row]``.

Padding rows: token 0 at position 0, slot -1 (the fused RoPE/KV-store kernel
skips it, so the cache is never written), context 1 (attends to one slot of
whatever block their table row names; the result is dropped).

Graphs share one memory pool and are captured largest first. The graph's
outputs (logits ``[b, V]`` float32) are static tensors, overwritten by the
next replay of any bucket.
"""

from dataclasses import replace

import numpy as np
import torch

from pdserve.engine.attention_metadata import AttentionMetadata
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.llama import LlamaForCausalLM

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """The buckets up to the first one that holds ``max_num_seqs`` rows."""
    out = []
    for b in BUCKETS:
        out.append(b)
        if b >= max_num_seqs:
            break
    return tuple(out)


class DecodeGraphs:
    """Captured decode steps. Owns the static input buffers and the graphs."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, max_num_seqs: int,
                 max_blocks: int, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.max_blocks = max_blocks
        self.device = device
        self.buckets = decode_buckets(max_num_seqs)
        size = self._size(self.buckets[-1])
        self._dev = torch.zeros(size, dtype=torch.int32, device=device)
        self._hosts = [torch.zeros(size, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]  # each buffer's last copy
        self._turn = 0  # the buffer that ``host_views`` hands out
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._workspaces: dict[int, object] = {}
        self.capture_seconds = 0.0

    def _size(self, b: int) -> int:
        return b * (4 + self.max_blocks)

    def bucket_for(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    @property
    def _host(self) -> torch.Tensor:
        return self._hosts[self._turn]

    def host_views(self, b: int) -> tuple[np.ndarray, ...]:
        """Numpy views of bucket ``b``'s pinned inputs: ids, positions, slots,
        context lens [b], tables [b, max_blocks]. Write them, then ``replay``. Waits
        until the copy out of this buffer two replays ago has run (long done in a
        pipelined loop)."""
        event = self._copied[self._turn]
        if event is not None:
            event.synchronize()
        h = self._host.numpy()
        return (h[:b], h[b:2 * b], h[2 * b:3 * b], h[3 * b:4 * b],
                h[4 * b:self._size(b)].reshape(b, self.max_blocks))

    def _device_views(self, b: int):
        d = self._dev
        return (d[:b], d[b:2 * b], d[2 * b:3 * b], d[3 * b:4 * b],
                d[4 * b:self._size(b)].view(b, self.max_blocks))

    def _forward(self, b: int) -> torch.Tensor:
        ids, pos, slots, ctx, tables = self._device_views(b)
        empty = torch.zeros(0, dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=slots, num_decode_tokens=b, decode_block_tables=tables,
            decode_context_lens=ctx, prefill_block_tables=empty.view(0, self.max_blocks),
            prefill_query_start_loc=torch.zeros(1, dtype=torch.int32, device=self.device),
            prefill_context_lens=empty)
        meta = replace(meta, decode_workspace=self._workspaces[b])
        hidden = self.model(ids, pos, self.kv_cache.layers, meta)
        return self.model.compute_logits(hidden)  # [b, V]

    def _new_workspace(self, b: int):
        """Split-K scratch for bucket ``b``, allocated before its capture and shared by
        every layer (each launch leaves its tickets zero: no memset in the graph)."""
        from pdserve.kernels.triton_decode import (
            DecodeWorkspace,
            default_tuning,
            num_partitions,
        )

        spec = self.kv_cache.spec
        bs = spec.block_size
        parts = num_partitions(self.max_blocks, bs, default_tuning(
            b, spec.num_kv_heads, self.max_blocks, bs, self.device))
        return DecodeWorkspace.allocate(b, self.model.cfg.num_heads, spec.num_kv_heads,
                                        spec.head_dim, parts, self.device)

    def _fill_padding(self, b: int, n: int) -> None:
        ids, pos, slots, ctx, _ = self.host_views(b)
        ids[n:] = 0
        pos[n:] = 0
        slots[n:] = -1
        ctx[n:] = 1

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (compiles kernels) and capture every bucket. Writes no KV (all rows
        are padding). Mutates the graphs and the static buffers."""
        import time

        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for b in reversed(self.buckets):
            self._workspaces[b] = self._new_workspace(b)
            self._fill_padding(b, 0)
            self._host.numpy()[4 * b:self._size(b)] = 0
            self._dev[:self._size(b)].copy_(self._host[:self._size(b)])
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(b)  # warm-up: Triton compiles, cuBLAS picks kernels
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[b] = self._forward(b)
            self._graphs[b] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0

    def replay_resident(self, b: int, write_kv: bool = False) -> torch.Tensor:
        """Replay bucket ``b`` again on the inputs already on the device (no host copy),
        for timing the graph alone. Unless ``write_kv``, first sets the slots to -1 so
        that no KV is written. Call with no step in flight; the next ``replay`` copies
        fresh inputs in. Returns the static logits [b, V]."""
        if not write_kv:
            self._dev[2 * b:3 * b].fill_(-1)
        self._graphs[b].replay()
        return self._logits[b]

    def replay(self, b: int, n: int, feed: torch.Tensor | None = None) -> torch.Tensor:
        """Pad rows ``n..b-1``, copy the inputs in, replay. Returns logits [b, V] (static:
        valid until the next replay). The caller wrote rows ``0..n-1`` of ``host_views``;
        with ``feed`` ([S] int64 on the device) their input ids are rows of ``feed``.
        Enqueues only; then hands out the other host buffer."""
        self._fill_padding(b, n)
        size = self._size(b)
        self._dev[:size].copy_(self._host[:size], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[self._turn] = event
        self._turn ^= 1
        if feed is not None:
            ids = self._dev[:n]
            ids.copy_(feed[ids.long()])  # [n]: row numbers -> the sampled ids
        self._graphs[b].replay()
        return self._logits[b]
