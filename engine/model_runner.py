"""Turns a ``SchedulerOutput`` into tensors, runs the model, and samples.

Owns the model, the KV cache tensors and (on CUDA) the decode graphs; knows
nothing of queues. The batch is packed decodes first (``AttentionMetadata``'s
layout). A step of decodes only runs a captured CUDA graph when one is
there (``cuda_graphs=True`` on CUDA, batch within the largest bucket; a
layer hook is not called on such a step); everything else runs eagerly.

Per step the host work is building index arrays: one entry per decode, a
numpy range per prefill. Each request's block ids are kept as an int32 array
(``BlockTableCache``) that grows with its blocks instead of being rebuilt.
"""

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.attention_metadata import AttentionMetadata
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.llama import LayerHook, LlamaForCausalLM
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler, SampleResult
from pdserve.engine.scheduler import ScheduledRequest, SchedulerOutput


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the hidden states to sample from
    sample_order: tuple[ScheduledRequest, ...]  # the requests those rows belong to
    graph_batch: int | None = None  # bucket of the captured decode graph, if one runs


class BlockTableCache:
    """Each running request's block ids as an int32 array, grown as blocks are added.

    An entry is reused while it is the same request object in the same life
    (preemption frees every block, so ``num_preemptions`` changes) and its
    blocks only grew; otherwise it is rebuilt.
    """

    def __init__(self) -> None:
        self._rows: dict[str, tuple[Request, int, np.ndarray, int]] = {}

    def row(self, req: Request) -> np.ndarray:
        """The request's block ids [>= len(req.blocks)] int32; read-only for the caller."""
        blocks = req.blocks
        n = len(blocks)
        ent = self._rows.get(req.request_id)
        if ent is not None and ent[0] is req and ent[1] == req.num_preemptions and ent[3] <= n:
            _, _, arr, have = ent
        else:
            arr, have = np.empty(max(16, n), dtype=np.int32), 0
        if n > have:
            if n > arr.shape[0]:
                grown = np.empty(max(n, 2 * arr.shape[0]), dtype=np.int32)
                grown[:have] = arr[:have]
                arr = grown
            arr[have:n] = [b.block_id for b in blocks[have:n]]
        self._rows[req.request_id] = (req, req.num_preemptions, arr, n)
        return arr

    def prune(self, keep_ids: set[str]) -> None:
        """Forget every request not in ``keep_ids``. Mutates the cache."""
        self._rows = {k: v for k, v in self._rows.items() if k in keep_ids}

    def __len__(self) -> int:
        return len(self._rows)


def _token_at(req: Request, p: int) -> int:
    n = len(req.prompt_token_ids)
    return req.prompt_token_ids[p] if p < n else req.output_token_ids[p - n]


def _token_range(req: Request, start: int, end: int) -> list[int]:
    n = len(req.prompt_token_ids)
    if end <= n:
        return req.prompt_token_ids[start:end]
    return req.all_token_ids[start:end]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, device: torch.device,
                 seed: int, *, max_num_seqs: int = 64, max_model_len: int | None = None,
                 cuda_graphs: bool = False) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.spec.block_size
        self.sampler = Sampler(seed)
        self.tables = BlockTableCache()
        self.graphs = None
        if cuda_graphs and device.type == "cuda" and max_model_len:
            from pdserve.engine.cuda_graphs import DecodeGraphs

            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = DecodeGraphs(model, kv_cache, max_num_seqs, max_blocks, device)
            self.graphs.capture()

    # ---- inputs ----------------------------------------------------------------------
    def _fill_decodes(self, decodes, ids, pos, slots, ctx, tables) -> None:
        """Write decode rows into host arrays (``tables`` rows wide enough for each)."""
        bs = self.block_size
        for i, s in enumerate(decodes):
            req = s.request
            p = req.num_computed_tokens
            row = self.tables.row(req)
            ids[i] = _token_at(req, p)
            pos[i] = p
            slots[i] = int(row[p // bs]) * bs + p % bs
            ctx[i] = p + 1
            nb = p // bs + 1
            tables[i, :nb] = row[:nb]

    def _prepare_graph(self, decodes: list[ScheduledRequest], bucket: int) -> ModelInputs:
        ids, pos, slots, ctx, tables = self.graphs.host_views(bucket)
        self._fill_decodes(decodes, ids, pos, slots, ctx, tables)
        n = len(decodes)
        sample = [i for i, s in enumerate(decodes)
                  if s.request.num_computed_tokens + 1 == s.request.num_tokens]
        empty = torch.zeros(0, dtype=torch.int32)
        meta = AttentionMetadata(torch.from_numpy(slots[:n]), n, torch.from_numpy(tables[:n]),
                                 torch.from_numpy(ctx[:n]), empty.view(0, 0),
                                 torch.zeros(1, dtype=torch.int32), empty)
        return ModelInputs(
            input_ids=torch.from_numpy(ids[:n]), positions=torch.from_numpy(pos[:n]),
            meta=meta, logits_indices=torch.tensor(sample, dtype=torch.int64),
            sample_order=tuple(decodes[i] for i in sample), graph_batch=bucket)

    def prepare(self, out: SchedulerOutput, use_graphs: bool = True) -> ModelInputs:
        """Build the step's inputs from request state. Reads the requests; writes only
        the runner's own buffers (the graph inputs on the graph path)."""
        bs = self.block_size
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in out.scheduled if s.num_new_tokens != 1]
        if len(self.tables) > 2 * len(out.scheduled) + 256:
            self.tables.prune({s.request.request_id for s in out.scheduled})
        if use_graphs and self.graphs is not None and not prefills:
            bucket = self.graphs.bucket_for(len(decodes))
            if bucket is not None:
                return self._prepare_graph(decodes, bucket)

        nd = len(decodes)
        nt = nd + sum(s.num_new_tokens for s in prefills)
        ids = np.empty(nt, dtype=np.int64)
        pos = np.empty(nt, dtype=np.int64)
        slots = np.empty(nt, dtype=np.int64)
        d_width = max((s.request.num_computed_tokens // bs + 1 for s in decodes), default=0)
        d_tables = np.zeros((nd, d_width), dtype=np.int32)
        d_ctx = np.empty(nd, dtype=np.int32)
        self._fill_decodes(decodes, ids, pos, slots, d_ctx, d_tables)

        logits_rows = [i for i, s in enumerate(decodes)
                       if s.request.num_computed_tokens + 1 == s.request.num_tokens]
        sample_order = [decodes[i] for i in logits_rows]
        p_width = max((-(-(s.request.num_computed_tokens + s.num_new_tokens) // bs)
                       for s in prefills), default=0)
        p_tables = np.zeros((len(prefills), p_width), dtype=np.int32)
        p_ctx = np.empty(len(prefills), dtype=np.int32)
        q_start = np.zeros(len(prefills) + 1, dtype=np.int32)
        t = nd
        for j, s in enumerate(prefills):
            req = s.request
            start, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
            row = self.tables.row(req)
            ids[t:t + s.num_new_tokens] = _token_range(req, start, end)
            r = np.arange(start, end, dtype=np.int64)
            pos[t:t + s.num_new_tokens] = r
            slots[t:t + s.num_new_tokens] = row[r // bs].astype(np.int64) * bs + r % bs
            nb = -(-end // bs)
            p_tables[j, :nb] = row[:nb]
            p_ctx[j] = end
            t += s.num_new_tokens
            q_start[j + 1] = t - nd
            if end == req.num_tokens:
                logits_rows.append(t - 1)
                sample_order.append(s)

        dev = self.device

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev)

        meta = AttentionMetadata(
            slot_mapping=put(slots), num_decode_tokens=nd,
            decode_block_tables=put(d_tables), decode_context_lens=put(d_ctx),
            prefill_block_tables=put(p_tables), prefill_query_start_loc=put(q_start),
            prefill_context_lens=put(p_ctx))
        return ModelInputs(
            input_ids=put(ids), positions=put(pos), meta=meta,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=dev),
            sample_order=tuple(sample_order))

    # ---- the step --------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput,
                layer_hook: LayerHook | None = None) -> tuple[ModelInputs, SampleResult]:
        """Run one step: writes K/V of every scheduled token into the cache (mutates it)
        and samples for the requests whose last scheduled token ends their sequence.
        ``layer_hook`` runs after each layer of an eager step; a step that replays a
        captured decode graph runs whole and does not call it (hooks exist for prefill
        work, such as pushing a layer's KV, and for progress inside long steps)."""
        inputs = self.prepare(out)
        if inputs.graph_batch is not None:
            n = inputs.meta.num_decode_tokens
            logits = self.graphs.replay(inputs.graph_batch, n)
            if len(inputs.sample_order) == n:
                logits = logits[:n]
            else:
                logits = logits[inputs.logits_indices.to(self.device)]
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache.layers,
                                inputs.meta, layer_hook)
            if not inputs.sample_order:
                return inputs, SampleResult([], [])
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
        if not inputs.sample_order:
            return inputs, SampleResult([], [])
        reqs = [s.request for s in inputs.sample_order]
        result = self.sampler.sample(logits, [r.request_id for r in reqs],
                                     [r.params for r in reqs])
        return inputs, result
