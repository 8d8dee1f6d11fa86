"""Sampling from logits: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Two paths with one contract. On the CPU each sampled row is drawn on its own
(``torch.multinomial``). On a GPU (or ``batched=True``) the whole batch is
sampled with tensor ops and one host transfer per step: temperature as a
column, top-k / top-p on one sort of the rows that need them, and the draw
as ``argmax(probs / E)`` with exponential noise ``E`` (an exponential race,
the same distribution as multinomial). Unseeded rows take their noise from
the engine's generator in one call; a seeded request draws its own row from
its own generator, so its tokens do not depend on the rest of the batch.

``sample_async`` only enqueues on a GPU: it returns a ``PendingSample`` whose
``token_ids`` stay on the device (the next step may read them there) and
whose ``result()`` waits for that step's copy to the host alone (a CUDA
event), not for later work on the stream. Every small tensor it sends to the
GPU goes from pinned memory without blocking, so launching a step never waits
for the one before it.
"""

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


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device``; to a GPU from pinned memory without
    blocking the host (a pageable copy would wait for all work queued on the stream)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda" or not values:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class PendingSample:
    """One step's sampled ids, possibly still being computed on the device.

    ``token_ids`` [N] int64 lives on the logits' device and may feed the next step
    there at once. ``result()`` blocks until this step's ids (and logprobs) have
    reached the host, and no longer: ``host`` is a pinned copy written after the
    sampling kernels, ``event`` marks its end. A CPU sample is ready (``ready``).
    """

    token_ids: torch.Tensor  # [N] int64, device
    ready: SampleResult | None = None
    host: torch.Tensor | None = None  # [N] int64, or the packed float64 layout below
    event: object = None  # torch.cuda.Event recorded after the copy into ``host``
    logprob_rows: tuple[int, ...] = ()  # rows that asked for logprobs, in order
    top_ns: tuple[int, ...] = ()  # how many alternatives each of those rows wants
    n_top: int = 0  # width of the packed top-N block (max of ``top_ns``)

    def wait(self) -> None:
        """Block until this step's sampling (and all device work before it) is done."""
        if self.event is not None:
            self.event.synchronize()

    def result(self) -> SampleResult:
        """Wait for this step's ids on the host and unpack them. Pure apart from waiting."""
        if self.ready is not None:
            return self.ready
        self.wait()
        host = self.host.tolist()
        n = int(self.token_ids.shape[0])
        if not self.logprob_rows:
            return SampleResult(host, [None] * n)
        # packed: [ids N | chosen logprob W | top values W x n_top | top ids W x n_top]
        ids = [int(t) for t in host[:n]]
        w, k = len(self.logprob_rows), self.n_top
        tv = host[n + w:n + w + w * k]
        ti = host[n + w + w * k:]
        logprobs: list[TokenLogprobs | None] = [None] * n
        for row, i in enumerate(self.logprob_rows):
            top = tuple((int(ti[row * k + j]), tv[row * k + j]) for j in range(self.top_ns[row]))
            logprobs[i] = TokenLogprobs(ids[i], host[n + row], top)
        return SampleResult(ids, logprobs)


def _host_copy(t: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Start copying ``t`` to pinned host memory; returns (host tensor, event at its end)."""
    if not t.is_cuda:
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class Sampler:
    """Holds one ``torch.Generator`` per seeded request so its draws do not depend on
    what else is in the batch; unseeded requests share the engine's generator."""

    def __init__(self, seed: int, batched: bool | None = None) -> None:
        """``batched``: None picks the batched path for GPU logits only."""
        self._seed = seed
        self._batched = batched
        self._default = torch.Generator().manual_seed(seed)
        self._per_request: dict[str, torch.Generator] = {}
        self._device_default: dict[torch.device, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator. Mutates the generator map."""
        self._per_request.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams,
                   device: torch.device | None = None) -> torch.Generator:
        device = device or torch.device("cpu")
        if params.seed is None:
            if device.type == "cpu":
                return self._default
            gen = self._device_default.get(device)
            if gen is None:
                gen = torch.Generator(device=device).manual_seed(self._seed)
                self._device_default[device] = gen
            return gen
        gen = self._per_request.get(request_id)
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device).manual_seed(params.seed)
            self._per_request[request_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, request_ids: list[str],
               params: list[SamplingParams]) -> SampleResult:
        """logits: [N, V] float32 (any device). Advances generators of sampled requests."""
        return self.sample_async(logits, request_ids, params).result()

    def sample_async(self, logits: torch.Tensor, request_ids: list[str],
                     params: list[SamplingParams]) -> PendingSample:
        """``sample`` without waiting for the device (see ``PendingSample``). Advances the
        generators of sampled requests (at once, in enqueue order)."""
        logits = logits.float()
        batched = self._batched if self._batched is not None else logits.is_cuda
        if batched:
            return self._sample_batched(logits, request_ids, params)
        result = self._sample_rowwise(logits, request_ids, params)
        return PendingSample(torch.tensor(result.token_ids, dtype=torch.int64), ready=result)

    def _sample_rowwise(self, logits: torch.Tensor, request_ids: list[str],
                        params: list[SamplingParams]) -> SampleResult:
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

    def _sample_batched(self, logits: torch.Tensor, request_ids: list[str],
                        params: list[SamplingParams]) -> PendingSample:
        """The batched path: enqueued only; one copy to the host, read by ``result()``."""
        dev = logits.device
        token_ids = logits.argmax(dim=-1)  # [N]
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            rows_t = to_device(rows, torch.int64, dev)
            chosen = sample_rows(logits[rows_t], [params[i] for i in rows],
                                 [self._generator(request_ids[i], params[i], dev)
                                  if params[i].seed is not None else None for i in rows],
                                 self._generator("", SamplingParams(), dev))
            token_ids = token_ids.index_copy(0, rows_t, chosen)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not want:
            host, event = _host_copy(token_ids)
            return PendingSample(token_ids, host=host, event=event)
        idx = to_device(want, torch.int64, dev)
        lp = torch.log_softmax(logits[idx], dim=-1)  # [W, V]
        n_top = max(params[i].logprobs for i in want)
        top_v, top_i = torch.topk(lp, n_top, dim=-1)
        chosen_lp = lp.gather(1, token_ids[idx][:, None])[:, 0]
        packed = torch.cat([token_ids.double(), chosen_lp.double(), top_v.double().flatten(),
                            top_i.double().flatten()])
        host, event = _host_copy(packed)
        return PendingSample(token_ids, host=host, event=event, logprob_rows=tuple(want),
                             top_ns=tuple(params[i].logprobs for i in want), n_top=n_top)


def sample_rows(logits: torch.Tensor,  # [S, V] float32, rows to sample
                params: list[SamplingParams],  # [S], none greedy
                generators: list[torch.Generator | None],  # [S]: a seeded row's own, or None
                shared: torch.Generator) -> torch.Tensor:  # [S] int64 token ids
    """Temperature, top-k, top-p and the draw for a batch of rows, as tensor ops.
    Advances ``shared`` once and each seeded row's generator once. Pure otherwise."""
    dev = logits.device
    s, v = logits.shape
    temps = to_device([p.temperature for p in params], torch.float32, dev)
    x = logits / temps[:, None]
    top_ks = [min(p.top_k, v) if p.top_k else v for p in params]
    top_ps = [p.top_p for p in params]
    if min(top_ks) < v or min(top_ps) < 1.0:
        srt, order = torch.sort(x, dim=-1, descending=True)  # [S, V]
        if min(top_ks) < v:
            k = to_device(top_ks, torch.int64, dev)[:, None] - 1
            kth = srt.gather(1, k)  # [S, 1]
            srt = srt.masked_fill(srt < kth, float("-inf"))
        if min(top_ps) < 1.0:
            probs = torch.softmax(srt, dim=-1)
            cum = probs.cumsum(-1)
            top_p = to_device(top_ps, torch.float32, dev)[:, None]
            srt = srt.masked_fill((cum - probs) > top_p, float("-inf"))
        x = torch.empty_like(x).scatter_(1, order, srt)
    probs = torch.softmax(x, dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=shared)  # [S, V]
    for row, gen in enumerate(generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return (probs / noise.clamp_min_(1e-20)).argmax(dim=-1)
