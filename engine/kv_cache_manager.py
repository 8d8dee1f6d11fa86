"""Per-request block bookkeeping over the ``BlockPool``: prefix hits, slots, freeing.

Verb pairs follow nano-vllm: ``can_allocate`` answers without side effects,
``allocate_slots`` does it. A request's ``blocks`` cover tokens
``[0, len(blocks) * block_size)``; full ones are registered in the prefix
cache under the chained hash as soon as their KV is computed.
"""

from pdserve.engine.block_hash import hash_block
from pdserve.engine.block_pool import Block, BlockPool
from pdserve.engine.request import Request


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, hash_seed: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.hash_seed = hash_seed

    def _ensure_hashes(self, request: Request, num_tokens: int) -> None:
        """Extend ``request.block_hashes`` to every full block in the first ``num_tokens``.
        Mutates ``request.block_hashes``."""
        bs = self.block_size
        if (len(request.block_hashes) + 1) * bs > num_tokens:
            return
        tokens = request.all_token_ids
        while (len(request.block_hashes) + 1) * bs <= num_tokens:
            i = len(request.block_hashes)
            parent = request.block_hashes[-1] if i else None
            request.block_hashes.append(hash_block(parent, tokens[i * bs:(i + 1) * bs],
                                                   self.hash_seed))

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """The longest run of cached blocks matching the request's tokens (hash and token
        equality), leaving at least one token to compute. Pure apart from hashing the
        request's tokens (mutates ``request.block_hashes``)."""
        if not self.pool.enable_caching:
            return []
        # At least one token must be computed so that there are logits to sample from.
        self._ensure_hashes(request, request.num_tokens - 1)
        tokens = request.all_token_ids
        bs = self.block_size
        hits: list[Block] = []
        for i, block_hash in enumerate(request.block_hashes):
            if (i + 1) * bs > request.num_tokens - 1:
                break
            block = self.pool.lookup(block_hash, tuple(tokens[i * bs:(i + 1) * bs]))
            if block is None:
                break
            hits.append(block)
        return hits

    def num_blocks_needed(self, request: Request, num_new_tokens: int,
                          num_hit_blocks: int = 0) -> int:
        """New blocks ``allocate_slots`` would take. Pure."""
        total = request.num_computed_tokens + num_new_tokens
        needed = -(-total // self.block_size)
        return max(0, needed - len(request.blocks) - num_hit_blocks)

    def can_allocate(self, request: Request, num_new_tokens: int,
                     hits: list[Block] | None = None) -> bool:
        """Whether ``allocate_slots`` would succeed. Pure. Hit blocks that are free count
        against the free pool (touching them takes them off it)."""
        hits = hits or []
        free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        need = self.num_blocks_needed(request, num_new_tokens, len(hits))
        return need + free_hits <= self.pool.num_free_blocks

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       hits: list[Block] | None = None) -> bool:
        """Give ``request`` blocks for ``num_computed_tokens + num_new_tokens`` tokens,
        first taking ``hits`` (prefix-cache blocks, only when it holds none yet).
        Returns False and changes nothing if the pool is short.
        Mutates: ``request.blocks``, ``request.num_computed_tokens`` (advanced over
        hits), ``request.num_cached_tokens`` and the pool."""
        hits = hits or []
        if not self.can_allocate(request, num_new_tokens, hits):
            return False
        if hits:
            assert not request.blocks, "prefix hits only for a request without blocks"
            self.pool.touch(hits)
            request.blocks = list(hits)
            request.num_registered_blocks = len(hits)  # hits are cached blocks already
            cached = len(hits) * self.block_size
            request.num_computed_tokens = cached
            request.num_cached_tokens = max(request.num_cached_tokens, cached)
            num_new_tokens -= cached
        need = self.num_blocks_needed(request, num_new_tokens)
        request.blocks.extend(self.pool.allocate(need))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's full, computed blocks not yet offered to the prefix cache
        (so each step costs only its new blocks). Mutates the pool's cache,
        ``request.block_hashes`` and ``request.num_registered_blocks``."""
        if not self.pool.enable_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.blocks))
        start = request.num_registered_blocks
        if num_full <= start:
            return
        self._ensure_hashes(request, num_full * self.block_size)
        tokens = request.all_token_ids
        bs = self.block_size
        for i in range(start, num_full):
            block = request.blocks[i]
            if block.block_hash is not None:
                continue
            parent = request.block_hashes[i - 1] if i else None
            self.pool.cache_block(block, request.block_hashes[i],
                                  tuple(tokens[i * bs:(i + 1) * bs]), parent)
        request.num_registered_blocks = num_full

    def free(self, request: Request) -> None:
        """Release every block of the request, tail first (so its tail is evicted first).
        Mutates the pool and empties ``request.blocks``."""
        self.pool.free(list(reversed(request.blocks)))
        request.blocks = []
        request.num_registered_blocks = 0
