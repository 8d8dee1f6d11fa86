"""Workloads: lists of ``RequestSpec`` (exact prompt token ids, output length, arrival).

    synthetic(n, input_dist, output_dist, pool, seed)
    shared_prefix(n, num_groups, prefix_len, suffix_dist, output_dist, pool, seed)
    from_trace(rows, pool, seed)        Azure / Mooncake rows (see ``traces``)
    poisson_arrivals(n, rate, seed)     and ``with_arrivals`` to stamp them on a workload

Prompts are token ids drawn from the served model's vocabulary (special tokens left out),
so a prompt has exactly the length asked for and is sent as ``/v1/completions``
``prompt: [ids]``. Every random stream is seeded by (seed, purpose, key), so the same
arguments give the same workload in any process. Mooncake: the tokens of block ``h`` depend
only on ``h``, hence equal ``hash_ids`` prefixes give equal token prefixes::

    hash_ids  [ 7 | 8 | 9 ]      block_tokens = 4, input 10 tokens
    tokens    [b7 b7 b7 b7 | b8 b8 b8 b8 | b9 b9]   (the last block cut to fit)
"""

import math
from dataclasses import dataclass, replace

import numpy as np

from pdserve.bench.traces import TraceRow

_SYNTH, _PREFIX, _SUFFIX, _BLOCK, _PAD, _LENGTHS = range(6)  # rng purposes


@dataclass(frozen=True)
class RequestSpec:
    prompt_token_ids: tuple[int, ...]
    num_output_tokens: int
    arrival_s: float = 0.0  # from the start of the run
    group: int | None = None  # shared-prefix group, if any


@dataclass(frozen=True)
class TokenPool:
    """Token ids a prompt may use: the vocabulary without special tokens."""

    token_ids: np.ndarray  # [V'] int64

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenPool":
        special = set(tokenizer.all_special_ids)
        return cls(np.array([i for i in range(len(tokenizer)) if i not in special]))

    @classmethod
    def from_range(cls, vocab_size: int, first: int = 0) -> "TokenPool":
        return cls(np.arange(first, vocab_size))

    def draw(self, key: tuple[int, ...], n: int) -> tuple[int, ...]:
        """``n`` ids from the stream named by ``key``. Pure: same key, same ids."""
        rng = np.random.default_rng(list(key))
        return tuple(int(t) for t in self.token_ids[rng.integers(0, len(self.token_ids), n)])


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: ``128``, ``uniform:64:256``, ``normal:128:32``,
    ``exp:128`` (exponential with that mean). Samples are ints >= 1."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "LengthDist":
        parts = str(text).split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", float(parts[0]))
            kind, nums = parts[0], [float(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"bad length distribution {text!r}") from None
        want = {"fixed": 1, "uniform": 2, "normal": 2, "exp": 1}
        if kind not in want or len(nums) != want[kind]:
            raise ValueError(f"bad length distribution {text!r}: use N, uniform:LO:HI, "
                             "normal:MEAN:STD or exp:MEAN")
        return cls(kind, *nums)

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        if self.kind == "fixed":
            x = np.full(n, self.a)
        elif self.kind == "uniform":
            x = rng.integers(int(self.a), int(self.b) + 1, n)
        elif self.kind == "normal":
            x = rng.normal(self.a, self.b, n)
        else:
            x = rng.exponential(self.a, n)
        return [max(1, int(round(v))) for v in x]


def synthetic(n: int, input_dist: LengthDist, output_dist: LengthDist, pool: TokenPool,
              seed: int = 0) -> list[RequestSpec]:
    rng = np.random.default_rng([seed, _LENGTHS])
    n_in, n_out = input_dist.sample(rng, n), output_dist.sample(rng, n)
    return [RequestSpec(pool.draw((seed, _SYNTH, i), n_in[i]), n_out[i]) for i in range(n)]


def shared_prefix(n: int, num_groups: int, prefix_len: int, suffix_dist: LengthDist,
                  output_dist: LengthDist, pool: TokenPool, seed: int = 0) -> list[RequestSpec]:
    """``num_groups`` long prefixes (a system prompt each); request i belongs to a group
    drawn at random and adds its own suffix. Groups are shuffled, not round-robin, so a
    router cannot win by alternation alone."""
    rng = np.random.default_rng([seed, _LENGTHS])
    groups = rng.integers(0, num_groups, n)
    n_suffix, n_out = suffix_dist.sample(rng, n), output_dist.sample(rng, n)
    prefixes = [pool.draw((seed, _PREFIX, g), prefix_len) for g in range(num_groups)]
    return [RequestSpec(prefixes[g] + pool.draw((seed, _SUFFIX, i), n_suffix[i]), n_out[i],
                        group=int(g)) for i, g in enumerate(groups)]


def mooncake_prompt(row: TraceRow, pool: TokenPool, seed: int = 0,
                    request_key: int = 0) -> tuple[int, ...]:
    """The row's prompt: block ``h`` of ``hash_ids`` is ``block_tokens`` ids drawn from
    (seed, h), cut to ``num_input_tokens``; padded from (seed, request_key) if short."""
    ids: list[int] = []
    for h in row.hash_ids[:math.ceil(row.num_input_tokens / row.block_tokens)]:
        ids.extend(pool.draw((seed, _BLOCK, h), row.block_tokens))
    if len(ids) < row.num_input_tokens:
        ids.extend(pool.draw((seed, _PAD, request_key), row.num_input_tokens - len(ids)))
    return tuple(ids[:row.num_input_tokens])


def from_trace(rows: list[TraceRow], pool: TokenPool, seed: int = 0) -> list[RequestSpec]:
    """Trace rows -> requests at the rows' timestamps. Mooncake rows share prefixes by
    ``hash_ids``; Azure rows (no prefix data) get independent random prompts."""
    out = []
    for i, r in enumerate(rows):
        if r.hash_ids is not None:
            prompt = mooncake_prompt(r, pool, seed, i)
        else:
            prompt = pool.draw((seed, _SYNTH, i), r.num_input_tokens)
        out.append(RequestSpec(prompt, r.num_output_tokens, r.timestamp_s))
    return out


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival times (s) of a Poisson process at ``rate`` req/s, the first at 0;
    ``rate = inf`` sends everything at once. Pure."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    gaps = np.random.default_rng([seed, 7919]).exponential(1.0 / rate, n)
    return [0.0] + np.cumsum(gaps[:-1]).tolist() if n else []


def with_arrivals(specs: list[RequestSpec], times: list[float]) -> list[RequestSpec]:
    return [replace(s, arrival_s=float(t)) for s, t in zip(specs, times, strict=True)]


def speed_up(specs: list[RequestSpec], speedup: float) -> list[RequestSpec]:
    """Trace timestamps replayed ``speedup`` times faster (2.0: half the gaps)."""
    return [replace(s, arrival_s=s.arrival_s / speedup) for s in specs]
