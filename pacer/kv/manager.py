"""Per-request block tables on top of the block pool: paired can_allocate / allocate / free, and prefix caching."""

from __future__ import annotations

from pacer.kv.block_pool import BlockPool, chain_key
from pacer.request import Request


class KVCacheManager:
    """Grows `request.block_ids` so the request's first `num_computed_tokens + n` tokens have a slot.

    Callers check `can_allocate` before `allocate`, so a failed allocation never half-happens. With prefix caching,
    a request's full blocks are published (`cache_computed`) once their KV is computed, and a request that starts
    takes the longest chain of them that its tokens match (`take_cached_prefix`), so it prefills only the rest
    (vLLM's automatic prefix caching). A block is shared read-only: only full blocks are published, and a request
    writes only past its last full hit.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.prefix_caching = prefix_caching

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    @property
    def prefix_cache_tokens(self) -> int:
        """The KV its prefix cache can hold (0 without one): what a front end's belief of it is sized to."""
        return self.capacity_tokens if self.prefix_caching else 0

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (vLLM's kv_cache_usage_perc); cached blocks nobody uses count as free."""
        return self.pool.num_used / self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        return max(0, self.blocks_for(request.num_computed_tokens + num_new_tokens) - len(request.block_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.num_new_blocks(request, num_new_tokens) <= self.pool.num_free

    def allocate(self, request: Request, num_new_tokens: int) -> list[int]:
        num_blocks = self.num_new_blocks(request, num_new_tokens)
        if num_blocks == 0:  # most decodes: the last block still has room
            return []
        new = self.pool.allocate(num_blocks)
        request.block_ids.extend(new)
        return new

    def num_free_slots(self, request: Request) -> int:
        """Tokens the request could add after its computed ones without preempting anyone: the room left in its
        blocks and in every free block."""
        return (len(request.block_ids) + self.pool.num_free) * self.block_size - request.num_computed_tokens

    def trim(self, request: Request, num_tokens: int) -> None:
        """Give back the request's blocks past those its first `num_tokens` tokens need: the KV reserved for drafts
        the model rejected. Those blocks were never published (only blocks full of computed tokens are)."""
        keep = self.blocks_for(num_tokens)
        assert request.num_cached_blocks <= keep, f"request {request.request_id}: trimming a published block"
        if keep < len(request.block_ids):
            self.pool.release(request.block_ids[keep:])
            del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        """Give back the request's blocks; its published ones stay findable until the pool reuses them."""
        self.pool.release(request.block_ids)
        request.block_ids = []
        request.num_cached_blocks = 0

    # ---- prefix caching ------------------------------------------------------------------------------------------

    def cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks that hold the request's leading tokens, longest chain first to last; at least one
        token is left out, since the model must run the last one to sample. Reads only."""
        if not self.prefix_caching:
            return []
        blocks: list[int] = []
        for i in range((request.num_tokens - 1) // self.block_size):
            block = self.pool.lookup(*self._block(request, i))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_cached_tokens(self, request: Request) -> int:
        """How many of the request's tokens a start now would find cached: what admission plans with."""
        return len(self.cached_prefix(request)) * self.block_size

    def take_cached_prefix(self, request: Request) -> int:
        """Start a request that holds no blocks with its cached prefix: its block table begins with those blocks
        (referenced) and its computed tokens with theirs. Returns the tokens found; `free` undoes it."""
        assert not request.block_ids, f"request {request.request_id} already holds KV blocks"
        blocks = self.cached_prefix(request)
        self.pool.touch(blocks)
        request.block_ids = blocks
        request.num_cached_blocks = len(blocks)
        request.num_computed_tokens = len(blocks) * self.block_size
        return request.num_computed_tokens

    def cache_computed(self, request: Request) -> None:
        """Publish the request's blocks that its computed tokens fill (called after each iteration)."""
        if not self.prefix_caching:
            return
        full = request.num_computed_tokens // self.block_size
        for i in range(request.num_cached_blocks, full):
            self.pool.cache(request.block_ids[i], *self._block(request, i))
        request.num_cached_blocks = max(request.num_cached_blocks, full)

    def _block(self, request: Request, i: int) -> tuple[int, int | None, tuple[int, ...]]:
        """(key, parent key, tokens) of the request's i-th full block; keys are computed once, in order (a
        lookup and a publish each walk the blocks from the first, so block i - 1's key is there)."""
        size, keys = self.block_size, request.block_hashes
        tokens = tuple(request.token_ids[i * size:(i + 1) * size])
        parent = keys[i - 1] if i else None
        if i == len(keys):
            keys.append(chain_key(parent, tokens))
        return keys[i], parent, tokens
