"""The pool of KV blocks: ref-counts, an O(1) LRU free list, and the prefix cache.

A block is *free* when no request holds it (``ref_cnt == 0``). A free block
may still carry a cached hash: it stays findable by prefix lookups until it
is reused, and the least recently freed one is reused first.

    free list (LRU order):  head -> [b7] -> [b3] -> [b9] <- tail
                            evicted first          freed last

KV events (``stored`` / ``removed``) are queued for the router's index and
drained by ``take_events``.
"""

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Block:
    """One KV block. ``block_hash``/``token_ids`` are set only once the block is full
    and registered in the prefix cache."""

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class KVEvent:
    kind: str  # "stored" | "removed" | "cleared"
    block_hashes: tuple[int, ...]
    parent_hash: int | None = None


class BlockPool:
    """Owns every block. Not thread-safe: one engine loop drives it."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # block_id -> None; insertion order is LRU order (first = evict next).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block_hash -> block_id
        self._events: list[KVEvent] = []

    # ---- queries (no side effects) -------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached-but-free ones included)."""
        return len(self._free)

    def free_block_ids(self) -> list[int]:
        """Free block ids in eviction order. Pure."""
        return list(self._free)

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> Block | None:
        """The cached block for ``block_hash`` whose tokens equal ``token_ids``, else None. Pure."""
        block_id = self._cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        return block if block.token_ids == token_ids else None

    # ---- mutations --------------------------------------------------------------------
    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[Block]:
        """Take ``num_blocks`` free blocks (LRU first), evicting their cached hashes; they
        are returned in ascending id order (which blocks are taken is LRU's choice; the
        order only makes a request's blocks contiguous where the free list allows, so
        the KV fabric moves runs of blocks with one descriptor instead of one each).

        Mutates: the free list, the prefix cache, the events. Raises if too few are free.
        """
        if num_blocks > len(self._free):
            raise RuntimeError(f"need {num_blocks} blocks, {len(self._free)} free")
        out = []
        evicted = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                evicted.append(block.block_hash)
                self._uncache(block)
            block.ref_cnt = 1
            out.append(block)
        if evicted:
            self._events.append(KVEvent("removed", tuple(evicted)))
        if num_blocks > 1:
            out.sort(key=lambda b: b.block_id)
        return out

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on cache hits. Mutates ref-counts and the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference on each block; blocks reaching zero join the LRU tail in
        the given order (pass a request's blocks tail-first so its last blocks are
        evicted first). Mutates ref-counts and the free list."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = None

    def cache_block(self, block: Block, block_hash: int, token_ids: tuple[int, ...],
                    parent_hash: int | None) -> bool:
        """Register a full block under ``block_hash``. Returns False (and changes nothing)
        if caching is off, the block is already registered, or another block holds
        the hash. Mutates the prefix cache and the events."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        block.token_ids = token_ids
        self._cached[block_hash] = block.block_id
        self._events.append(KVEvent("stored", (block_hash,), parent_hash))
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash of a free block. Only possible when no block is held."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            self._uncache(block)
        self._events.append(KVEvent("cleared", ()))
        return True

    def take_events(self) -> list[KVEvent]:
        """Return and clear the queued KV events."""
        events, self._events = self._events, []
        return events

    def _uncache(self, block: Block) -> None:
        if block.block_hash is not None and self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
        block.block_hash = None
        block.token_ids = None
