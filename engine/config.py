"""Engine configuration: frozen dataclasses, validated on construction."""

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the engine needs, read from an HF config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, float | str], ...]  # sorted items, hashable
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]

    @staticmethod
    def from_hf(cfg) -> "ModelConfig":
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        legacy = getattr(cfg, "rope_scaling", None)
        if legacy and not rope.get("rope_type"):
            rope.update(legacy)
        theta = rope.pop("rope_theta", None) or getattr(cfg, "rope_theta", 10000.0)
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        rope["rope_type"] = rope_type
        rope.pop("type", None)
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope type {rope_type!r} (default, llama3, linear)")
        eos = getattr(cfg, "eos_token_id", None)
        if isinstance(eos, list | tuple):
            eos_ids = tuple(eos)
        else:
            eos_ids = (eos,) if eos is not None else ()
        model_type = cfg.model_type
        bias = bool(getattr(cfg, "attention_bias", model_type == "qwen2"))
        return ModelConfig(
            model_type=model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=tuple(sorted((k, v) for k, v in rope.items()
                                      if isinstance(v, int | float | str))),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=bias or model_type == "qwen2",
            max_position_embeddings=cfg.max_position_embeddings,
            eos_token_ids=eos_ids,
        )


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    """What a user chooses. ``None`` means "pick a default for the device"."""

    model: str = "smollm2-135m"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" | "float32" | "float16" | "bfloat16"
    block_size: int = 16
    num_blocks: int | None = None  # KV pool size; None sizes it from memory
    kv_cache_memory_gb: float = 1.0  # CPU pool budget when num_blocks is None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget (prefill chunk)
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    hash_seed: int = 0
    seed: int = 0
    cuda_graphs: bool = True
    # one-step lookahead (engine/async_step.py): launch the next decode step before
    # reading this one's tokens; None: on when CUDA graphs run
    async_scheduling: bool | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]
