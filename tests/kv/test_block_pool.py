"""Block pool and manager: accounting, ref counts, paired can_allocate / allocate."""

from __future__ import annotations

import pytest

from pacer.kv import BlockPool, KVCacheManager
from pacer.request import Request


def test_pool_allocate_release_and_ref_counts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and pool.num_used == 3
    pool.share(a[:1])
    pool.release(a)
    assert pool.num_free == 3  # the shared block is still held once
    pool.release(a[:1])
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="can_allocate"):
        pool.allocate(5)
    with pytest.raises(AssertionError, match="double free"):
        pool.release(a[:1])


def test_manager_grows_block_tables_by_whole_blocks():
    kv = KVCacheManager(num_blocks=5, block_size=4)
    r = Request("a", list(range(6)))
    assert kv.num_new_blocks(r, 6) == 2
    kv.allocate(r, 6)
    r.num_computed_tokens = 6
    assert kv.num_new_blocks(r, 2) == 0 and kv.num_new_blocks(r, 3) == 1
    assert kv.can_allocate(r, 14) and not kv.can_allocate(r, 15)
    kv.free(r)
    assert r.block_ids == [] and kv.num_free_blocks == 5 and kv.usage == 0
