"""The cost model the selector predicts with, its profile file, and its online fit.

Three formulas (seconds), each linear in its coefficients so they can be fitted
by least squares from what workers report::

    prefill(n new tokens after p cached) = prefill_step_s
                                         + n * prefill_token_s
                                         + n * (p + n / 2) * prefill_attn_s
    decode_step(b sequences, c context tokens in the batch)
                                         = decode_step_s + b * decode_seq_s + c * decode_ctx_s
    transfer(k blocks, pair)             = latency(pair)
                                         + k * block_size * kv_bytes_per_token / bandwidth(pair)

``CostModel`` is frozen: the calibrator builds a new one after each fit, and
the selector reads one snapshot per request.

Calibration (``Calibrator``): each load report carries cumulative counters
(prefill steps / tokens / attention products / seconds, decode steps /
sequences / context tokens / seconds, and per prefill peer the KV transfers /
bytes / wire seconds the decode worker completed). The difference between two
reports of a worker is one sample of the formula summed over what happened in
between: for a pair, ``seconds = transfers * latency + bytes / bandwidth``. We
keep the last ``window`` samples per formula (per pair for transfers) and solve
a ridge least squares pulled towards the profile's coefficients (the prior weighs
as much as ``strength`` typical samples), so a cluster with few samples predicts
near the profile and one with many with its own measurements. Each pair with
samples gets its own latency and bandwidth; the pooled samples of every pair
give the default for pairs without any (the profile's until a first sample).

Public names: ``CostModel``, ``load_profile``, ``Calibrator``.
"""

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

PREFILL_KEYS = ("prefill_step_s", "prefill_token_s", "prefill_attn_s")
DECODE_KEYS = ("decode_step_s", "decode_seq_s", "decode_ctx_s")


@dataclass(frozen=True)
class CostModel:
    prefill_step_s: float = 0.0
    prefill_token_s: float = 1e-4
    prefill_attn_s: float = 0.0
    decode_step_s: float = 0.02
    decode_seq_s: float = 0.0
    decode_ctx_s: float = 0.0
    kv_bytes_per_token: int = 0
    block_size: int = 16
    transfer_latency_s: float = 0.0
    bandwidth_bytes_s: float = 1e9
    pair_bandwidth_bytes_s: dict = field(default_factory=dict)  # "p->d" -> bytes/s
    pair_latency_s: dict = field(default_factory=dict)  # "p->d" -> s per transfer
    prefill_chunk_tokens: int = 512  # tokens per step when a decode worker prefills

    def prefill_s(self, num_new_tokens: int, num_cached_tokens: int = 0) -> float:
        """Compute time of ``num_new_tokens`` after ``num_cached_tokens``. Pure."""
        if num_new_tokens <= 0:
            return 0.0
        n, p = num_new_tokens, num_cached_tokens
        steps = -(-n // self.prefill_chunk_tokens)
        return (steps * self.prefill_step_s + n * self.prefill_token_s
                + n * (p + n / 2) * self.prefill_attn_s)

    def decode_step(self, num_seqs: int, num_context_tokens: int) -> float:
        """One decode step of a batch. Pure."""
        if num_seqs <= 0:
            return 0.0
        return (self.decode_step_s + num_seqs * self.decode_seq_s
                + num_context_tokens * self.decode_ctx_s)

    def bandwidth(self, src: str | None, dst: str) -> float:
        return self.pair_bandwidth_bytes_s.get(f"{src}->{dst}", self.bandwidth_bytes_s)

    def latency(self, src: str | None, dst: str) -> float:
        return self.pair_latency_s.get(f"{src}->{dst}", self.transfer_latency_s)

    def transfer_s(self, num_blocks: int, src: str | None, dst: str) -> float:
        """Time to move ``num_blocks`` KV blocks from ``src`` to ``dst``. Pure."""
        if num_blocks <= 0:
            return 0.0
        nbytes = num_blocks * self.block_size * self.kv_bytes_per_token
        return self.latency(src, dst) + nbytes / self.bandwidth(src, dst)


def load_profile(path: str | Path) -> CostModel:
    """Read a profile YAML (keys: CostModel's fields). Raises ValueError naming the file
    and the key on an unknown key or a negative value."""
    p = str(path)
    raw = yaml.safe_load(Path(p).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: the top level must be a mapping")
    raw = {k: v for k, v in raw.items() if k not in ("name", "source")}
    names = {f.name for f in dataclasses.fields(CostModel)}
    for k, v in raw.items():
        if k not in names:
            raise ValueError(f"{p}: unknown key '{k}' (allowed: {', '.join(sorted(names))})")
        if not k.startswith("pair_") and (not isinstance(v, int | float) or v < 0):
            raise ValueError(f"{p}: key '{k}' must be a non-negative number, got {v!r}")
    for k in ("kv_bytes_per_token", "block_size", "prefill_chunk_tokens"):
        if k in raw:
            raw[k] = int(raw[k])
    return CostModel(**raw)


def ridge_fit(x: np.ndarray, y: np.ndarray, prior: np.ndarray, strength: float) -> np.ndarray:
    """argmin_w |x w - y|^2 + strength * sum_j s_j (w_j - prior_j)^2, s_j = mean(x_j^2),
    clipped at zero. Pure."""
    scale = np.maximum((x * x).mean(axis=0), 1e-30)
    a = x.T @ x + strength * np.diag(scale)
    b = x.T @ y + strength * scale * prior
    return np.maximum(np.linalg.solve(a, b), 0.0)


class Calibrator:
    """Fits a ``CostModel`` from load reports. Mutated by ``observe``; ``model`` is the
    current fit (a frozen value, safe to hand out)."""

    def __init__(self, profile: CostModel, window: int = 64, strength: float = 4.0) -> None:
        self.profile = profile
        self.model = profile
        self.window = window
        self.strength = strength
        self._last: dict[str, dict] = {}
        self._prefill: deque = deque(maxlen=window)  # (steps, tokens, attn, seconds)
        self._decode: deque = deque(maxlen=window)  # (steps, seqs, ctx, seconds)
        self._transfers: dict[str, deque] = {}  # "p->d" -> (transfers, bytes, seconds)

    def forget(self, worker_id: str) -> None:
        """Drop the worker's last report: its next one is a new baseline."""
        self._last.pop(worker_id, None)

    def observe(self, worker_id: str, report: dict) -> None:
        """Take one load report's cumulative counters; refit when it adds a sample.
        ``report["kv_received"]`` rows name their peer by worker id. Mutates the
        samples, the last report kept per worker, and ``model``."""
        last = self._last.get(worker_id)
        self._last[worker_id] = report
        if last is None:
            return

        def delta(k: str) -> float:
            return float(report.get(k, 0)) - float(last.get(k, 0))

        changed = False
        d = [delta(k) for k in ("prefill_steps", "prefill_tokens", "prefill_attn_tokens",
                                "prefill_seconds")]
        if d[0] > 0 and d[3] > 0 and min(d) >= 0:
            self._prefill.append(d)
            changed = True
        d = [delta(k) for k in ("decode_steps", "decode_seqs", "decode_ctx_tokens",
                                "decode_seconds")]
        if d[0] > 0 and d[3] > 0 and min(d) >= 0:
            self._decode.append(d)
            changed = True
        before = {r["peer"]: r for r in last.get("kv_received", [])}
        for row in report.get("kv_received", []):
            old = before.get(row["peer"], {})
            d = [float(row.get(k, 0)) - float(old.get(k, 0))
                 for k in ("num_transfers", "bytes", "seconds")]
            if d[0] > 0 and d[2] > 0 and min(d) >= 0:  # seconds 0: not measured
                key = f"{row['peer']}->{worker_id}"
                self._transfers.setdefault(key, deque(maxlen=self.window)).append(d)
                changed = True
        if changed:
            self.model = self.fit()

    def _fit_transfer(self, samples, latency: float, bandwidth: float) -> tuple[float, float]:
        """(latency, bandwidth) from (transfers, bytes, seconds) samples. Pure."""
        s = np.array(samples, dtype=float)
        w = ridge_fit(s[:, :2], s[:, 2], np.array([latency, 1.0 / bandwidth]), self.strength)
        return float(w[0]), (1.0 / float(w[1]) if w[1] > 0 else bandwidth)

    def fit(self) -> CostModel:
        """A CostModel from the samples so far (the profile where there are none). Pure."""
        p = self.profile
        upd = {}
        if self._prefill:
            s = np.array(self._prefill, dtype=float)
            prior = np.array([getattr(p, k) for k in PREFILL_KEYS])
            w = ridge_fit(s[:, :3], s[:, 3], prior, self.strength)
            upd.update(zip(PREFILL_KEYS, map(float, w), strict=True))
        if self._decode:
            s = np.array(self._decode, dtype=float)
            prior = np.array([getattr(p, k) for k in DECODE_KEYS])
            w = ridge_fit(s[:, :3], s[:, 3], prior, self.strength)
            upd.update(zip(DECODE_KEYS, map(float, w), strict=True))
        if self._transfers:
            pooled = [x for q in self._transfers.values() for x in q]
            lat, bw = self._fit_transfer(pooled, p.transfer_latency_s, p.bandwidth_bytes_s)
            upd.update(transfer_latency_s=lat, bandwidth_bytes_s=bw,
                       pair_latency_s=dict(p.pair_latency_s),
                       pair_bandwidth_bytes_s=dict(p.pair_bandwidth_bytes_s))
            for key, q in sorted(self._transfers.items()):
                src, dst = key.split("->")
                lat, bw = self._fit_transfer(q, p.latency(src, dst), p.bandwidth(src, dst))
                upd["pair_latency_s"][key] = lat
                upd["pair_bandwidth_bytes_s"][key] = bw
        return dataclasses.replace(p, **upd)
