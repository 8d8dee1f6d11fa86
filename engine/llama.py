"""The Llama family (Llama 2/3, Qwen2, Mistral, SmolLM) over the paged KV cache.

Our own torch modules: RMSNorm, RoPE (with Llama-3 scaling), GQA attention
through ``pdserve.kernels`` ops, SwiGLU, tied or untied embeddings. Q/K/V
and gate/up projections are fused; ``load_weights`` maps HF names onto them.
No transformers code runs in the forward pass. On CUDA the element-wise
work runs as fused Triton kernels (``kernels.triton_fused``): residual add +
RMSNorm, RoPE + KV store, SiLU * up; the residual stream is passed between
layers so that its add folds into the next norm. The linear layers are
``engine.linear.Linear``: ``nn.Linear`` with a faster GEMM call on the CPU.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pdserve import kernels
from pdserve.engine.attention_metadata import AttentionMetadata
from pdserve.engine.config import ModelConfig
from pdserve.engine.linear import Linear
from pdserve.engine.rope import RotaryEmbedding, rotate_
from pdserve.kernels import ops

# Called after each layer's K/V are stored: (layer_index) -> None.
LayerHook = Callable[[int], None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x), or with ``residual``: RMSNorm(x + residual) and the sum (the new
        residual). On CUDA the sum is written into ``residual`` (mutated)."""
        if x.is_cuda:
            from pdserve.kernels.triton_fused import rms_norm

            out = rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused call; the same float32 ops as below, bit for bit
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x, positions, rope, k_cache, v_cache, meta: AttentionMetadata,
                rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``rope_tables``: the step's ``rope.tables(positions, dtype)``, taken once for
        every layer (CPU); None: looked up here."""
        t = x.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        if x.is_cuda:  # rotates q in place, stores rotated k and v
            from pdserve.kernels.triton_fused import rope_store_kv

            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(t, hq, d)  # [T, Hq, D]
            k = k.view(t, hkv, d)  # [T, Hkv, D]
            v = v.view(t, hkv, d)
            rope_store_kv(q, k, v, positions, rope.cos, rope.sin, k_cache, v_cache,
                          meta.slot_mapping)
        else:
            qk = qkv[:, :self.q_size + self.kv_size].view(t, hq + hkv, d)  # [T, Hq + Hkv, D]
            rotate_(qk, *(rope_tables or rope.tables(positions, x.dtype)))  # q, k in place
            q, k = qk[:, :hq], qk[:, hq:]
            v = qkv[:, self.q_size + self.kv_size:].view(t, hkv, d)
            kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        if nd == t:
            out = kernels.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                                 meta.decode_context_lens, self.scale,
                                                 meta.decode_workspace)
        elif nd == 0:
            out = kernels.paged_prefill_attention(
                q, k_cache, v_cache, meta.prefill_block_tables, meta.prefill_query_start_loc,
                meta.prefill_context_lens, self.scale)
        else:
            out = torch.empty_like(q)
            out[:nd] = kernels.paged_decode_attention(
                q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                self.scale, meta.decode_workspace)
            out[nd:] = kernels.paged_prefill_attention(
                q[nd:], k_cache, v_cache, meta.prefill_block_tables,
                meta.prefill_query_start_loc, meta.prefill_context_lens, self.scale)
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        if x.is_cuda:
            from pdserve.kernels.triton_fused import silu_and_mul

            w = self.gate_up_proj.weight
            if ops.can_gemv(x, w):  # decode rows: the activation in the GEMV's epilogue
                return self.down_proj(ops.gate_up_silu_small_m(x, w))
            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # views of one new tensor
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, positions, rope, k_cache, v_cache, meta, rope_tables=None):
        """Returns (this layer's MLP output, the residual stream before it); their sum
        is the layer's output. ``residual`` None: ``x`` is the embedding."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rope, k_cache, v_cache, meta, rope_tables)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                    dict(cfg.rope_scaling))

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v) [NB,B,Hkv,D]
        meta: AttentionMetadata,
        layer_hook: LayerHook | None = None,
    ) -> torch.Tensor:  # [T, hidden]
        """Run the decoder; writes every token's K/V into the cache (mutates kv_caches)."""
        x = self.embed_tokens(input_ids)
        residual = None
        tables = None if x.is_cuda else self.rope.tables(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv_caches[i]
            x, residual = layer(x, residual, positions, self.rope, k_cache, v_cache, meta,
                                tables)
            if layer_hook is not None:
                layer_hook(i)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [N, V]

    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors into the fused parameters. Raises on a missing weight."""
        cfg = self.cfg

        def take(name: str) -> torch.Tensor:
            for key in (name, f"model.{name}"):
                if key in state:
                    return state[key]
            raise KeyError(f"weight {name!r} missing from checkpoint")

        self.embed_tokens.weight.copy_(take("embed_tokens.weight"))
        self.norm.weight.copy_(take("norm.weight"))
        if cfg.tie_word_embeddings or "lm_head.weight" not in state:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.weight.copy_(state["lm_head.weight"])
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            attn = layer.self_attn
            attn.qkv_proj.weight.copy_(torch.cat([take(p + f"self_attn.{n}_proj.weight")
                                                  for n in "qkv"]))
            if attn.qkv_proj.bias is not None:
                attn.qkv_proj.bias.copy_(torch.cat([take(p + f"self_attn.{n}_proj.bias")
                                                    for n in "qkv"]))
            attn.o_proj.weight.copy_(take(p + "self_attn.o_proj.weight"))
            layer.mlp.gate_up_proj.weight.copy_(torch.cat([take(p + "mlp.gate_proj.weight"),
                                                           take(p + "mlp.up_proj.weight")]))
            layer.mlp.down_proj.weight.copy_(take(p + "mlp.down_proj.weight"))
            layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
