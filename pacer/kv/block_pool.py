"""A fixed pool of KV blocks with ref counts and a free list."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out physical block ids.

    Invariants: num_free + num_used == num_blocks; a block is in the free list iff its ref count
    is 0. Ref counts exist so that several requests can share a block (forks, prefixes).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free (call can_allocate first)")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def share(self, block_ids: list[int]) -> None:
        for b in block_ids:
            assert self.ref_counts[b] > 0, f"sharing free block {b}"
            self.ref_counts[b] += 1

    def release(self, block_ids: list[int]) -> None:
        # Released in reverse so a request's tail blocks are reused last (better locality for
        # a prefix cache later: the head of a prompt is the part most likely to be shared).
        for b in reversed(block_ids):
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)
