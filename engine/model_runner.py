"""Turns a ``SchedulerOutput`` into tensors, runs the model, and samples.

Owns the model and the KV cache tensors; knows nothing of queues. The batch
is packed decodes first (``AttentionMetadata``'s layout).
"""

from dataclasses import dataclass

import torch

from pdserve.engine.attention_metadata import AttentionMetadata
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.llama import LayerHook, LlamaForCausalLM
from pdserve.engine.sampler import Sampler, SampleResult
from pdserve.engine.scheduler import ScheduledRequest, SchedulerOutput


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the hidden states to sample from
    sample_order: tuple[ScheduledRequest, ...]  # the requests those rows belong to


def _pad_tables(rows: list[list[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows] or [[0]][:0],
                        dtype=torch.int32).reshape(len(rows), width)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, device: torch.device,
                 seed: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.spec.block_size
        self.sampler = Sampler(seed)

    def prepare(self, out: SchedulerOutput) -> ModelInputs:
        """Build the step's tensors from request state. Pure (reads the requests)."""
        bs = self.block_size
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in out.scheduled if s.num_new_tokens != 1]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sample_order: list[ScheduledRequest] = []
        q_start = [0]
        for s in decodes + prefills:
            req = s.request
            start, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
            ids.extend(req.all_token_ids[start:end])
            pos.extend(range(start, end))
            block_ids = req.block_ids
            slots.extend(block_ids[p // bs] * bs + p % bs for p in range(start, end))
            if s.num_new_tokens != 1:
                q_start.append(q_start[-1] + s.num_new_tokens)
            if end == req.num_tokens:
                logits_rows.append(len(ids) - 1)
                sample_order.append(s)

        def tables(group):
            return _pad_tables([s.request.block_ids for s in group]).to(self.device)

        def ctx(group):
            return torch.tensor([s.request.num_computed_tokens + s.num_new_tokens for s in group],
                                dtype=torch.int32, device=self.device)

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decode_tokens=len(decodes),
            decode_block_tables=tables(decodes),
            decode_context_lens=ctx(decodes),
            prefill_block_tables=tables(prefills),
            prefill_query_start_loc=torch.tensor(q_start, dtype=torch.int32, device=dev),
            prefill_context_lens=ctx(prefills),
        )
        return ModelInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(pos, dtype=torch.int64, device=dev),
            meta=meta,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=dev),
            sample_order=tuple(sample_order),
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput,
                layer_hook: LayerHook | None = None) -> tuple[ModelInputs, SampleResult]:
        """Run one step: writes K/V of every scheduled token into the cache (mutates it)
        and samples for the requests whose last scheduled token ends their sequence."""
        inputs = self.prepare(out)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache.layers,
                            inputs.meta, layer_hook)
        if not inputs.sample_order:
            return inputs, SampleResult([], [])
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        reqs = [s.request for s in inputs.sample_order]
        result = self.sampler.sample(logits, [r.request_id for r in reqs],
                                     [r.params for r in reqs])
        return inputs, result
