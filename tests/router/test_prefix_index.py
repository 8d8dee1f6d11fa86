"""The router's prefix index: exact per-worker prefix depths, eviction, workers leaving."""

from pdserve.engine.block_hash import hash_block_chain
from pdserve.router.prefix_index import PrefixIndex


def test_match_counts_leading_blocks_per_worker():
    idx = PrefixIndex()
    idx.store("a", [10, 11, 12])
    idx.store("b", [10, 12, 13])  # hole at 11: only the first block counts
    idx.store("c", [99])
    assert idx.match([10, 11, 12, 13]) == {"a": 3, "b": 1}
    assert idx.match([99, 10]) == {"c": 1}
    assert idx.match([42]) == {}
    assert idx.match([]) == {}


def test_full_chain_hit_and_removal():
    idx = PrefixIndex()
    idx.store("a", [1, 2, 3])
    assert idx.match([1, 2, 3]) == {"a": 3}
    idx.remove("a", [2, 77])  # 77 unknown: ignored
    assert idx.match([1, 2, 3]) == {"a": 1}
    assert idx.num_blocks("a") == 2
    idx.remove("nobody", [1])
    assert idx.holds("a", 1) and not idx.holds("a", 2)


def test_worker_leaving_drops_its_entries_only():
    idx = PrefixIndex()
    idx.store("a", [1, 2])
    idx.store("b", [1, 2, 3])
    assert idx.clear_worker("b") == 3
    assert idx.match([1, 2, 3]) == {"a": 2}
    assert idx.workers() == ["a"]
    assert idx.clear_worker("b") == 0
    idx.replace("a", [5])
    assert idx.match([1]) == {} and idx.match([5]) == {"a": 1}


def test_router_hashes_match_the_workers_hash():
    tokens = list(range(40))
    chain = hash_block_chain(tokens, 16, seed=7)
    assert len(chain) == 2  # the trailing 8 tokens are not a full block
    idx = PrefixIndex()
    idx.store("w", hash_block_chain(tokens[:32], 16, seed=7))
    assert idx.match(chain) == {"w": 2}
    assert idx.match(hash_block_chain(tokens, 16, seed=8)) == {}
