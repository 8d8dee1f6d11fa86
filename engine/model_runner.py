"""Turns a ``SchedulerOutput`` into tensors, runs the model, and samples.

Owns the model, the KV cache tensors and (on CUDA) the decode graphs; knows
nothing of queues. The batch is packed decodes first (``AttentionMetadata``'s
layout). A step of decodes only runs a captured CUDA graph when one is
there (``cuda_graphs=True`` on CUDA, batch within the largest bucket; a
layer hook is not called on such a step); everything else runs eagerly.

Per step the host work is building index arrays: one entry per decode, a
numpy range per prefill. Each request's block ids are kept as an int32 array
(``BlockTableCache``) that grows with its blocks instead of being rebuilt.

``launch`` enqueues a step and returns its sampled ids still on the device
(``PendingSample``); ``execute`` is ``launch`` plus waiting for them. A
lookahead step (``TokenFeed``, see ``async_step``) runs each decode one
position past ``num_computed_tokens``, its input id read on the device from
the previous, not yet processed, step's sampled ids.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch

from pdserve.engine.attention_metadata import AttentionMetadata
from pdserve.engine.block_table import BlockTableCache
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.llama import LayerHook, LlamaForCausalLM
from pdserve.engine.request import Request
from pdserve.engine.sampler import PendingSample, Sampler, SampleResult, to_device
from pdserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from pdserve.kernels.reference import decode_gather


@dataclass(frozen=True)
class TokenFeed:
    """A lookahead step's token source: the previous step's sampled ids on the device.

    Every request of the step is a decode that ran in the previous step, whose result
    the host has not read yet: it runs at position ``num_computed_tokens + 1`` and its
    input id is ``token_ids[rows[request_id]]``.
    """

    token_ids: torch.Tensor  # [S] int64 on the model's device
    rows: dict[str, int]  # request id -> its row in ``token_ids``


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # [T]; with a feed, rows of ``feed.token_ids`` instead
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the hidden states to sample from
    sample_order: tuple[ScheduledRequest, ...]  # the requests those rows belong to
    graph_batch: int | None = None  # bucket of the captured decode graph, if one runs
    feed: TokenFeed | None = None


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
    def _fill_decodes(self, decodes, ids, pos, slots, ctx, tables,
                      feed: TokenFeed | None = None) -> None:
        """Write decode rows into host arrays (``tables`` rows wide enough for each).
        With ``feed`` each row runs one position ahead and ``ids`` holds feed rows."""
        bs = self.block_size
        ahead = 0 if feed is None else 1
        for i, s in enumerate(decodes):
            req = s.request
            p = req.num_computed_tokens + ahead
            row = self.tables.row(req)
            ids[i] = _token_at(req, p) if feed is None else feed.rows[req.request_id]
            pos[i] = p
            slots[i] = int(row[p // bs]) * bs + p % bs
            ctx[i] = p + 1
            nb = p // bs + 1
            tables[i, :nb] = row[:nb]

    def _prepare_graph(self, decodes: list[ScheduledRequest], bucket: int,
                       feed: TokenFeed | None) -> ModelInputs:
        ids, pos, slots, ctx, tables = self.graphs.host_views(bucket)
        self._fill_decodes(decodes, ids, pos, slots, ctx, tables, feed)
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
            sample_order=tuple(decodes[i] for i in sample), graph_batch=bucket, feed=feed)

    def prepare(self, out: SchedulerOutput, use_graphs: bool = True,
                feed: TokenFeed | None = None) -> ModelInputs:
        """Build the step's inputs from request state (``feed``: a lookahead step of
        decodes only, see ``TokenFeed``). Reads the requests; writes only the runner's
        own buffers (the graph inputs on the graph path)."""
        bs = self.block_size
        ahead = 0 if feed is None else 1
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in out.scheduled if s.num_new_tokens != 1]
        assert feed is None or not prefills, "a lookahead step holds decodes only"
        if len(self.tables) > 2 * len(out.scheduled) + 256:
            self.tables.prune({s.request.request_id for s in out.scheduled})
        if use_graphs and self.graphs is not None and not prefills:
            bucket = self.graphs.bucket_for(len(decodes))
            if bucket is not None:
                return self._prepare_graph(decodes, bucket, feed)

        nd = len(decodes)
        nt = nd + sum(s.num_new_tokens for s in prefills)
        ids = np.empty(nt, dtype=np.int64)
        pos = np.empty(nt, dtype=np.int64)
        slots = np.empty(nt, dtype=np.int64)
        d_width = max(((s.request.num_computed_tokens + ahead) // bs + 1 for s in decodes),
                      default=0)
        d_tables = np.zeros((nd, d_width), dtype=np.int32)
        d_ctx = np.empty(nd, dtype=np.int32)
        self._fill_decodes(decodes, ids, pos, slots, d_ctx, d_tables, feed)

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

        def put(a: np.ndarray) -> torch.Tensor:  # to a GPU without blocking (pinned)
            t = torch.from_numpy(a)
            if dev.type != "cuda" or t.numel() == 0:
                return t.to(dev)
            return t.pin_memory().to(dev, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=put(slots), num_decode_tokens=nd,
            decode_block_tables=put(d_tables), decode_context_lens=put(d_ctx),
            prefill_block_tables=put(p_tables), prefill_query_start_loc=put(q_start),
            prefill_context_lens=put(p_ctx))
        if dev.type != "cuda" and nd:  # one gather plan for every layer's reference decode
            meta = replace(meta, decode_workspace=decode_gather(
                meta.decode_block_tables, meta.decode_context_lens, bs))
        return ModelInputs(
            input_ids=put(ids), positions=put(pos), meta=meta,
            logits_indices=to_device(logits_rows, torch.int64, dev),
            sample_order=tuple(sample_order), feed=feed)

    # ---- the step --------------------------------------------------------------------
    def execute(self, out: SchedulerOutput,
                layer_hook: LayerHook | None = None) -> tuple[ModelInputs, SampleResult]:
        """``launch`` and wait for the sampled ids (see ``launch``)."""
        inputs, pending = self.launch(out, layer_hook)
        return inputs, pending.result()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, layer_hook: LayerHook | None = None,
               feed: TokenFeed | None = None) -> tuple[ModelInputs, PendingSample]:
        """Enqueue one step: writes K/V of every scheduled token into the cache (mutates
        it) and samples for the requests whose last scheduled token ends their sequence
        (advances their generators). The returned ids are safe to read on the device at
        once and on the host through ``PendingSample.result()``.
        ``layer_hook`` runs after each layer of an eager step; a step that replays a
        captured decode graph runs whole and does not call it (hooks exist for prefill
        work, such as pushing a layer's KV, and for progress inside long steps)."""
        inputs = self.prepare(out, feed=feed)
        if inputs.graph_batch is not None:
            n = inputs.meta.num_decode_tokens
            logits = self.graphs.replay(inputs.graph_batch, n,
                                        feed.token_ids if feed is not None else None)
            if len(inputs.sample_order) == n:
                logits = logits[:n]
            else:
                logits = logits[inputs.logits_indices.to(self.device)]
        else:
            ids = inputs.input_ids if feed is None else feed.token_ids[inputs.input_ids]
            hidden = self.model(ids, inputs.positions, self.kv_cache.layers, inputs.meta,
                                layer_hook)
            logits = None
            if inputs.sample_order:
                logits = self.model.compute_logits(hidden[inputs.logits_indices])
        if not inputs.sample_order:
            return inputs, PendingSample(torch.zeros(0, dtype=torch.int64),
                                         ready=SampleResult([], []))
        reqs = [s.request for s in inputs.sample_order]
        pending = self.sampler.sample_async(logits, [r.request_id for r in reqs],
                                            [r.params for r in reqs])
        return inputs, pending
