"""Sampling from logits: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from dataclasses import dataclass

import torch

from pdserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's logprob and the top-N alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    """Holds one ``torch.Generator`` per seeded request so its draws do not depend on
    what else is in the batch; unseeded requests share the engine's generator."""

    def __init__(self, seed: int) -> None:
        self._default = torch.Generator().manual_seed(seed)
        self._per_request: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator. Mutates the generator map."""
        self._per_request.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._default
        gen = self._per_request.get(request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(params.seed)
            self._per_request[request_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, request_ids: list[str],
               params: list[SamplingParams]) -> SampleResult:
        """logits: [N, V] float32 (any device). Advances generators of sampled requests."""
        logits = logits.float()
        greedy_ids = logits.argmax(dim=-1)
        token_ids = greedy_ids.tolist()
        for i, p in enumerate(params):
            if p.greedy:
                continue
            row = logits[i].cpu() / p.temperature
            if p.top_k:
                kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = torch.sort(row, descending=True)
                probs = torch.softmax(sorted_logits, dim=-1)
                cum = probs.cumsum(-1)
                drop = (cum - probs) > p.top_p  # keep the smallest prefix reaching top_p
                row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
            probs = torch.softmax(row, dim=-1)
            gen = self._generator(request_ids[i], p)
            token_ids[i] = int(torch.multinomial(probs, 1, generator=gen).item())
        logprobs: list[TokenLogprobs | None] = [None] * len(params)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            lp = torch.log_softmax(logits[want], dim=-1).cpu()
            for row, i in enumerate(want):
                n = params[i].logprobs
                top_v, top_i = torch.topk(lp[row], n) if n else (torch.empty(0), torch.empty(0))
                logprobs[i] = TokenLogprobs(
                    token_ids[i], float(lp[row, token_ids[i]]),
                    tuple(zip(top_i.tolist(), top_v.tolist(), strict=True)))
        return SampleResult(token_ids, logprobs)
