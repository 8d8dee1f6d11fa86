"""The router's prefix index: which worker holds which KV block, from the workers' KV events.

Blocks are named by the chained hash of ``engine.block_hash`` (the same seeded
function every worker uses), so a block hash names its whole prefix: if worker W
holds block ``h_i`` of a request's chain, it held ``h_0 .. h_{i-1}`` when it
stored it. A lookup walks the request's chain and counts, per worker, how many
leading blocks it holds::

    chain:      h0   h1   h2   h3
    worker a:   x    x    x    .      -> 3 blocks
    worker b:   x    .    x    x      -> 1 block (a hole ends the prefix)

The index is a plain mapping ``hash -> {worker ids}`` plus the reverse
``worker -> {hashes}`` so that a worker that leaves (or clears its cache) is
dropped in one call. It keeps no order and no LRU: workers evict, and say so in
their events. Not thread-safe: one asyncio loop (or the simulator) owns it.

Public names: ``PrefixIndex``.
"""

from collections.abc import Iterable, Sequence


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}  # block hash -> worker ids
        self._blocks: dict[str, set[int]] = {}  # worker id -> block hashes

    # ---- mutations ------------------------------------------------------------------
    def store(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """Record that ``worker_id`` now holds ``block_hashes``. Idempotent."""
        mine = self._blocks.setdefault(worker_id, set())
        for h in block_hashes:
            mine.add(h)
            self._holders.setdefault(h, set()).add(worker_id)

    def remove(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """Record that ``worker_id`` evicted ``block_hashes``; unknown ones are ignored."""
        mine = self._blocks.get(worker_id)
        if mine is None:
            return
        for h in block_hashes:
            if h in mine:
                mine.discard(h)
                holders = self._holders[h]
                holders.discard(worker_id)
                if not holders:
                    del self._holders[h]

    def clear_worker(self, worker_id: str) -> int:
        """Forget everything ``worker_id`` holds (it left, cleared its cache, or is about
        to send a snapshot). Returns the number of blocks dropped."""
        mine = self._blocks.pop(worker_id, set())
        for h in mine:
            holders = self._holders[h]
            holders.discard(worker_id)
            if not holders:
                del self._holders[h]
        return len(mine)

    def replace(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """Set ``worker_id``'s blocks to exactly ``block_hashes`` (a snapshot)."""
        self.clear_worker(worker_id)
        self.store(worker_id, block_hashes)

    # ---- queries (pure) ------------------------------------------------------------
    def num_blocks(self, worker_id: str) -> int:
        return len(self._blocks.get(worker_id, ()))

    def workers(self) -> list[str]:
        return sorted(self._blocks)

    def holds(self, worker_id: str, block_hash: int) -> bool:
        return worker_id in self._holders.get(block_hash, ())

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Per worker, the number of leading blocks of ``block_hashes`` it holds; workers
        holding no leading block are absent. Pure; O(len(chain) * holders)."""
        out: dict[str, int] = {}
        if not block_hashes:
            return out
        active = set(self._holders.get(block_hashes[0], ()))
        depth = 0
        while active:
            depth += 1
            if depth == len(block_hashes):
                break
            nxt = self._holders.get(block_hashes[depth], set())
            for w in active - nxt:
                out[w] = depth
            active &= nxt
        for w in active:
            out[w] = depth
        return out
