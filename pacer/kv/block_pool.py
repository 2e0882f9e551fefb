"""A fixed pool of KV blocks with ref counts, a free list in eviction order, and the prefix-hash map."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class BlockPool:
    """Hands out physical block ids; keeps the contents of freed full blocks findable until they are reused.

    Invariants: a block is in the free list iff its ref count is 0, so num_free + num_used == num_blocks. A free
    block with a key is cached: `lookup` can still find it, and `allocate` takes it last among the free blocks in
    least-recently-freed order (LRU), dropping its key then. A key maps to at most one block and a block holds at
    most one key, so num_free_uncached + num_cached_free + num_used == num_blocks.

    A key is a block's place in a token chain: `chain_key(parent key, its tokens)`. A block is found only with the
    parent key and tokens it was stored with, so a hash collision is a miss, never someone else's KV.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Free blocks in eviction order: the first is allocated first. Removing from the middle is O(1), which a
        # cache hit on a free block needs (and, unlike a plain dict, so is popping the first again and again).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._contents: dict[int, tuple[int, int | None, tuple[int, ...]]] = {}  # cached block -> (key, parent, tokens)
        self._cached: dict[int, int] = {}  # key -> block

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: the unused ones and the cached ones nobody references."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks whose contents `lookup` can find (referenced or not)."""
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free (call can_allocate first)")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference to cached blocks (a prefix hit): a free one leaves the free list."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1

    def release(self, block_ids: Sequence[int]) -> None:
        # Released in reverse so a request's tail blocks are evicted first: the head of a prompt is the part
        # other requests are most likely to share.
        for b in reversed(block_ids):
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None

    def cache(self, block: int, key: int, parent: int | None, tokens: tuple[int, ...]) -> None:
        """Make a full block findable by its key. If another block already holds the key (two requests computed
        the same prefix at once), this one stays private."""
        assert self.ref_counts[block] > 0, f"caching free block {block}"
        if key in self._cached or block in self._contents:
            return
        self._cached[key] = block
        self._contents[block] = (key, parent, tokens)

    def lookup(self, key: int, parent: int | None, tokens: tuple[int, ...]) -> int | None:
        """The block holding exactly these tokens after this parent, if it is cached."""
        block = self._cached.get(key)
        # .get, not []: admission peeks from the server's thread while the engine may evict (a miss is harmless)
        if block is None or self._contents.get(block) != (key, parent, tokens):
            return None
        return block

    def _evict(self, block: int) -> None:
        entry = self._contents.pop(block, None)
        if entry is not None:
            del self._cached[entry[0]]


def chain_key(parent: int | None, tokens: tuple[int, ...]) -> int:
    """A block's key: its tokens chained with its parent's key (vLLM's and nano-vllm's prefix hash)."""
    return hash((parent, tokens))
