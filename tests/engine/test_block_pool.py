"""Block pool and KV cache manager: exact block ids and eviction order."""

import pytest

from pdserve.engine.block_hash import hash_block, hash_block_chain
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams


def make_req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(), max_tokens=8)


def test_allocate_takes_lowest_ids_first_and_free_appends_in_order():
    pool = BlockPool(6)
    a = pool.allocate(2)
    b = pool.allocate(3)
    assert [x.block_id for x in a] == [0, 1]
    assert [x.block_id for x in b] == [2, 3, 4]
    assert pool.free_block_ids() == [5]
    pool.free(list(reversed(b)))
    assert pool.free_block_ids() == [5, 4, 3, 2]
    # LRU picks 5 and 4 (the oldest free); they are handed out in ascending order
    assert [x.block_id for x in pool.allocate(2)] == [4, 5]
    assert pool.free_block_ids() == [3, 2]


def test_lru_eviction_of_cached_blocks_and_events():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, blk in enumerate(blocks):
        assert pool.cache_block(blk, 100 + i, (i,), None)
    pool.free([blocks[1], blocks[0], blocks[2]])  # LRU order: 1, 0, 2
    assert pool.lookup(100, (0,)) is blocks[0]
    assert pool.lookup(100, (9,)) is None  # token-equality check on a hash hit
    (first,) = pool.allocate(1)
    assert first.block_id == 1 and first.block_hash is None
    assert pool.lookup(101, (1,)) is None  # evicted
    events = pool.take_events()
    assert [(e.kind, e.block_hashes) for e in events] == [
        ("stored", (100,)), ("stored", (101,)), ("stored", (102,)), ("removed", (101,))]
    assert pool.take_events() == []


def test_touch_revives_a_free_cached_block_and_double_free_raises():
    pool = BlockPool(2)
    (blk,) = pool.allocate(1)
    pool.cache_block(blk, 7, (1, 2), None)
    pool.free([blk])
    assert pool.num_free_blocks == 2
    pool.touch([blk])
    assert blk.ref_cnt == 1 and pool.free_block_ids() == [1]
    pool.free([blk])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([blk])


def test_hash_chain_is_seeded_and_chained():
    toks = list(range(40))
    chain = hash_block_chain(toks, 16, seed=1)
    assert len(chain) == 2  # the partial third block is not hashed
    assert chain[0] == hash_block(None, toks[:16], 1)
    assert chain[1] == hash_block(chain[0], toks[16:32], 1)
    assert hash_block_chain(toks, 16, seed=2)[0] != chain[0]
    assert hash_block(None, toks[:16], 1) == hash_block(None, tuple(toks[:16]), 1)


def test_prefix_hits_reuse_blocks_and_leave_one_token_to_compute():
    pool = BlockPool(10)
    kv = KVCacheManager(pool, block_size=4, hash_seed=0)
    a = make_req("a", range(10))  # blocks: [0..4) [4..8) [8..10)
    assert kv.allocate_slots(a, 10)
    assert a.block_ids == [0, 1, 2]
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)
    kv.free(a)
    assert pool.free_block_ids() == [3, 4, 5, 6, 7, 8, 9, 2, 1, 0]
    b = make_req("b", list(range(8)) + [99, 98, 97])
    hits = kv.find_cached_prefix(b)
    assert [h.block_id for h in hits] == [0, 1]
    assert kv.allocate_slots(b, 11, hits)
    assert b.block_ids == [0, 1, 3] and b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    c = make_req("c", range(8))  # fully cached prompt: the last block is recomputed
    hits_c = kv.find_cached_prefix(c)
    assert [h.block_id for h in hits_c] == [0]


def test_can_allocate_counts_free_hit_blocks():
    pool = BlockPool(2)
    kv = KVCacheManager(pool, block_size=2, hash_seed=0)
    a = make_req("a", [1, 2, 3])
    assert kv.allocate_slots(a, 3)
    a.num_computed_tokens = 3
    kv.cache_full_blocks(a)
    kv.free(a)
    b = make_req("b", [1, 2, 3, 4, 5, 6])
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 1
    assert not kv.can_allocate(b, 6, hits)  # 1 hit + 2 new > 2 blocks
    assert pool.num_free_blocks == 2 and hits[0].ref_cnt == 0  # nothing changed
