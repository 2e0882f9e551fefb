"""Per-request block tables on top of the block pool: paired can_allocate / allocate / free."""

from __future__ import annotations

from pacer.kv.block_pool import BlockPool
from pacer.request import Request


class KVCacheManager:
    """Grows `request.block_ids` so the request's first `num_computed_tokens + n` tokens have a slot.

    Callers check `can_allocate` before `allocate`, so a failed allocation never half-happens.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

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
    def usage(self) -> float:
        """Fraction of blocks in use (vLLM's kv_cache_usage_perc)."""
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

    def free(self, request: Request) -> None:
        self.pool.release(request.block_ids)
        request.block_ids = []
