"""The values that describe a KV transfer: who may talk, and which blocks move.

``FabricIdentity`` is what two fabric peers compare at the handshake: if any
field differs the KV bytes would be misread, so the receiver refuses.
``TransferPlan`` is the one object that crosses from the connector's
scheduler half (``KVConnectorScheduler``) to its worker half
(``KVSender`` / ``KVReceiver``)::

    prompt blocks       0   1   2 | 3   4   5        (num_cached_blocks = 3)
    decode side holds   d0  d1  d2| -   -   -
    plan moves                    | s3->d3 s4->d4 s5->d5

Both are frozen and free of torch so the scheduler half can build them.
"""

from dataclasses import dataclass, fields


def make_transfer_id(request_id: str, attempt: int) -> str:
    """The transfer id both sides derive for a request's ``attempt``. Pure."""
    return f"{request_id}#{attempt}"


@dataclass(frozen=True)
class FabricIdentity:
    """What must be equal on both sides for KV bytes to mean the same thing."""

    model: str
    block_size: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hash_seed: int
    hash_algorithm: str

    def __post_init__(self) -> None:
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FabricIdentity.{name} must be positive, got "
                                 f"{getattr(self, name)}")
        if self.dtype.startswith("torch."):
            raise ValueError(f"FabricIdentity.dtype must be a bare name, got {self.dtype!r}")

    @classmethod
    def from_kv_spec(cls, model: str, spec, hash_seed: int,
                     hash_algorithm: str) -> "FabricIdentity":
        """Identity of a cache described by an ``engine.kv_cache.KVCacheSpec``. Pure."""
        return cls(model=model, block_size=spec.block_size,
                   dtype=str(spec.dtype).removeprefix("torch."), num_layers=spec.num_layers,
                   num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                   hash_seed=hash_seed, hash_algorithm=hash_algorithm)

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def bytes_per_block(self) -> int:
        """K (or V) of one block in one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    def first_mismatch(self, decode: "FabricIdentity") -> str | None:
        """``None`` if equal, else a message naming the first differing field. Pure.

        ``self`` is the prefill (sending) side, ``decode`` the receiving side.
        """
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(decode, f.name)
            if mine != theirs:
                return f"{f.name} mismatch: prefill {mine}, decode {theirs}"
        return None


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
             "float8_e5m2": 1, "float64": 8, "uint8": 1, "int8": 1}


@dataclass(frozen=True)
class TransferPlan:
    """Which blocks of one request move, for every layer, in one attempt.

    ``src_block_ids[i]`` (prefill side) lands in ``dst_block_ids[i]`` (decode
    side). ``src_block_ids`` is ``None`` in the decode side's copy of the plan:
    the receiver never needs it, and it is not known there before prefill runs.
    A plan with no blocks is valid: only its finish frame travels.
    """

    transfer_id: str
    request_id: str
    attempt: int
    src_block_ids: tuple[int, ...] | None
    dst_block_ids: tuple[int, ...]
    num_layers: int

    def __post_init__(self) -> None:
        if not self.transfer_id or len(self.transfer_id.encode()) > 255:
            raise ValueError("TransferPlan.transfer_id must be 1..255 bytes")
        if len(self.request_id.encode()) > 255:
            raise ValueError("TransferPlan.request_id must be at most 255 bytes")
        if self.attempt < 0 or self.num_layers <= 0:
            raise ValueError(f"bad attempt {self.attempt} or num_layers {self.num_layers}")
        if self.src_block_ids is not None and len(self.src_block_ids) != len(self.dst_block_ids):
            raise ValueError(f"TransferPlan {self.transfer_id}: {len(self.src_block_ids)} src "
                             f"blocks but {len(self.dst_block_ids)} dst blocks")
        if len(set(self.dst_block_ids)) != len(self.dst_block_ids):
            raise ValueError(f"TransferPlan {self.transfer_id}: duplicate dst block ids")
        if any(b < 0 for b in self.dst_block_ids + (self.src_block_ids or ())):
            raise ValueError(f"TransferPlan {self.transfer_id}: negative block id")

    @property
    def num_blocks(self) -> int:
        return len(self.dst_block_ids)

    def with_src(self, src_block_ids: tuple[int, ...]) -> "TransferPlan":
        """The same plan with the prefill side's block ids filled in. Pure."""
        return TransferPlan(self.transfer_id, self.request_id, self.attempt,
                            tuple(src_block_ids), self.dst_block_ids, self.num_layers)
