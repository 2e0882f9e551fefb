"""Block pool and manager: accounting, ref counts, paired can_allocate / allocate, and prefix caching."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacer.kv import BlockPool, KVCacheManager
from pacer.kv.block_pool import chain_key
from pacer.request import Request


def test_pool_allocate_release_and_ref_counts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and pool.num_used == 3
    pool.touch(a[:1])
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


def _run(kv: KVCacheManager, request: Request) -> int:
    """Start a request as the scheduler does, compute all its tokens in one go, publish its full blocks."""
    hit = kv.take_cached_prefix(request)
    kv.allocate(request, request.num_uncomputed_tokens)
    request.num_computed_tokens = request.num_tokens
    kv.cache_computed(request)
    return hit


def test_a_finished_requests_full_blocks_serve_the_next_request_with_the_same_prefix():
    kv = KVCacheManager(num_blocks=8, block_size=4, prefix_caching=True)
    first = Request("a", list(range(10)))  # blocks [0-3] [4-7] full, [8-9] partial
    assert _run(kv, first) == 0
    first_blocks = list(first.block_ids)
    kv.free(first)
    assert kv.num_free_blocks == 8 and kv.pool.num_cached == 2  # free, yet still findable
    second = Request("b", list(range(8)) + [99, 98, 97])
    assert _run(kv, second) == 8 and second.block_ids[:2] == first_blocks[:2]
    assert kv.pool.ref_counts[second.block_ids[0]] == 1
    # the whole prompt cached: the last block is computed again, since its last token must be run to sample
    third = Request("c", list(range(8)))
    assert kv.take_cached_prefix(third) == 4


def test_eviction_takes_the_least_recently_freed_and_a_request_tail_first():
    kv = KVCacheManager(num_blocks=5, block_size=2, prefix_caching=True)
    a, b = Request("a", [1, 2, 3, 4, 5]), Request("b", [7, 8, 9])
    _run(kv, a)  # blocks [1 2] [3 4] cached, [5] partial
    _run(kv, b)  # [7 8] cached, [9] partial
    kv.free(a)  # a's blocks join the free list tail first, then b's
    kv.free(b)
    assert kv.pool.num_cached == 3
    kv.allocate(Request("x", [0]), 1)  # takes a's partial tail block: no cached block lost
    assert kv.pool.num_cached == 3
    kv.allocate(Request("y", [0] * 6), 3)  # a's [3 4], then a's [1 2], then b's partial tail
    assert kv.pool.num_cached == 1
    assert kv.take_cached_prefix(Request("z", [1, 2, 3, 4, 5])) == 0
    assert kv.take_cached_prefix(Request("w", [7, 8, 9])) == 2


def test_a_key_collision_is_a_miss_not_someone_elses_kv():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.cache(block, key=42, parent=None, tokens=(1, 2))
    assert pool.lookup(42, None, (1, 2)) == block
    assert pool.lookup(42, None, (1, 3)) is None and pool.lookup(42, 7, (1, 2)) is None


def test_without_prefix_caching_nothing_is_found():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first = Request("a", list(range(10)))
    _run(kv, first)
    kv.free(first)
    assert kv.take_cached_prefix(Request("b", list(range(10)))) == 0 and kv.pool.num_cached == 0


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["start", "grow", "draft", "free"]), st.integers(0, 5),
                              st.lists(st.integers(0, 2), min_size=1, max_size=14)), max_size=40),
       block_size=st.sampled_from([1, 2, 3, 4]), num_blocks=st.integers(4, 16))
def test_pool_invariants_under_random_requests_sharing_prefixes(ops, block_size, num_blocks):
    """Tokens from {0, 1, 2} make prefixes collide often. After every operation: a block is in the free list iff
    nobody references it; the unused, the cached-unused and the used blocks add up; every block a request holds
    has the tokens the request has at that place (so a hit never hands out a block that was reused, and a child is
    never found without its parent; past its tokens, only the KV of rejected drafts, never read); ref counts equal the
    holders; a published block holds only verified tokens."""
    kv = KVCacheManager(num_blocks, block_size, prefix_caching=True)
    live: dict[int, Request] = {}
    written: dict[int, tuple[int, ...]] = {}  # block -> the tokens its KV was computed for
    for op, slot, tokens in ops:
        request = live.get(slot)
        if op == "start" and request is None:
            request = Request(f"r{slot}", tokens)
            kv.take_cached_prefix(request)
            if not kv.can_allocate(request, request.num_uncomputed_tokens):
                kv.free(request)
                continue
            start = request.num_computed_tokens
            kv.allocate(request, request.num_uncomputed_tokens)
            _write(written, request, start, block_size)
            kv.cache_computed(request)
            live[slot] = request
        elif op == "grow" and request is not None and kv.can_allocate(request, len(tokens)):
            start = request.num_computed_tokens
            request.token_ids.extend(tokens)
            kv.allocate(request, len(tokens))
            _write(written, request, start, block_size)
            kv.cache_computed(request)
        elif op == "draft" and request is not None and kv.can_allocate(request, len(tokens)):
            # a verify row: KV written for the drafts `tokens`, of which the model accepts the first few
            start, num_accepted = request.num_computed_tokens, slot % (len(tokens) + 1)
            kv.allocate(request, len(tokens))
            for j, token in enumerate(tokens):
                block, offset = request.block_ids[(start + j) // block_size], (start + j) % block_size
                written[block] = written.get(block, ())[:offset] + (token,)
            request.token_ids.extend(tokens[:num_accepted])
            request.num_computed_tokens += num_accepted
            kv.trim(request, request.num_computed_tokens)
            kv.cache_computed(request)
            assert len(request.block_ids) == kv.blocks_for(request.num_tokens)
        elif op == "free" and request is not None:
            kv.free(live.pop(slot))
        pool = kv.pool
        holders = [b for r in live.values() for b in r.block_ids]
        assert all(pool.ref_counts[b] == holders.count(b) for b in range(num_blocks))
        assert set(pool._free) == {b for b in range(num_blocks) if pool.ref_counts[b] == 0}
        cached_free = sum(1 for b in pool._free if b in pool._contents)
        assert (pool.num_free - cached_free) + cached_free + pool.num_used == num_blocks
        for r in live.values():
            for i, b in enumerate(r.block_ids):
                mine = tuple(r.token_ids[i * block_size:(i + 1) * block_size])
                assert written[b][:len(mine)] == mine[:len(written[b])], f"block {b} of {r.request_id} holds other tokens"
        for key, block in pool._cached.items():
            stored, parent, chunk = pool._contents[block]
            assert key == stored == chain_key(parent, chunk) and written[block] == chunk


def _write(written: dict[int, tuple[int, ...]], request: Request, start: int, block_size: int) -> None:
    """Record what the model would write: tokens start.. of the request into the blocks that hold them."""
    request.num_computed_tokens = request.num_tokens
    for i in range(start // block_size, -(-request.num_tokens // block_size)):
        written[request.block_ids[i]] = tuple(request.token_ids[i * block_size:(i + 1) * block_size])
