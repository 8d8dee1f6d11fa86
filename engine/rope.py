"""Rotary position embeddings (HF "rotate half" layout), with Llama-3 and linear scaling.

Two ways to apply them, with the same results bit for bit: ``RotaryEmbedding``'s
call returns rotated copies of q and k (HF's ``x * cos + rotate_half(x) * sin``);
the eager CPU path takes the step's ``tables`` once and rotates q and k together
in place with ``rotate_``, which writes ``rotate_half(x) * sin`` as
``roll(x, D/2) * sin_signed`` (``sin`` with its first half negated: the same
products, since ``(-a) * b == a * (-b)`` exactly) so that a layer's rotation is
four tensor ops.
"""

import math

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies after the configured scaling. Pure."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict) -> None:
        super().__init__()
        inv = inv_frequencies(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, Hq, D], k: [T, Hkv, D] -> rotated copies. Pure."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


    def tables(self, positions: torch.Tensor,  # [T] int64
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin_signed), each [T, 1, D] in ``dtype``: the rows of ``positions``,
        ``sin_signed`` with its first half negated, for ``rotate_``. Pure."""
        cos = self.cos.index_select(0, positions).to(dtype)
        sin = self.sin.index_select(0, positions).to(dtype)  # a new tensor: negated in place
        sin[:, :sin.shape[1] // 2].neg_()
        return cos.unsqueeze(1), sin.unsqueeze(1)


def rotate_(x: torch.Tensor,  # [T, H, D], mutated
            cos: torch.Tensor,  # [T, 1, D] from ``RotaryEmbedding.tables``
            sin_signed: torch.Tensor) -> None:  # [T, 1, D]
    """Rotate ``x`` in place: ``x * cos + rotate_half(x) * sin``, the same values as
    ``RotaryEmbedding``'s call. Mutates ``x`` (a view, e.g. q and k side by side in the
    QKV projection's output, is fine)."""
    rolled = x.roll(x.shape[-1] // 2, -1)  # [x2, x1]
    rolled.mul_(sin_signed)  # [-x2 * sin, x1 * sin]
    x.mul_(cos).add_(rolled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
