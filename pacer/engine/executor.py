"""The seam between scheduling and execution: the real model runner and the simulator both fit it."""

from __future__ import annotations

from typing import Protocol

from pacer.scheduling import ModelOutput, SchedulerOutput


class KVHandover(Protocol):
    """A prefill's KV on its way to another engine (disaggregated serving): its first `num_tokens` tokens' blocks,
    from block `first_block` on (the receiver holds the ones before it)."""

    @property
    def num_tokens(self) -> int: ...

    @property
    def first_block(self) -> int: ...

    def skip(self, num_blocks: int) -> KVHandover:
        """Without its next `num_blocks` blocks, which the receiver already holds: only the rest moves."""
        ...


class Executor(Protocol):
    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        """Run one iteration of the plan: compute KV for the scheduled tokens, sample where due."""
        ...

    def export_kv(self, block_ids: list[int], num_tokens: int) -> KVHandover:
        """A copy of the KV of a request's first `num_tokens` tokens, held in `block_ids`, taken before the
        scheduler frees them: what a prefill engine hands to a decode engine."""
        ...

    def import_kv(self, block_ids: list[int], payload: KVHandover) -> None:
        """Write another engine's `export_kv` (an executor of the same kind, model and block size) into these
        blocks, which the scheduler allocated, from the payload's `first_block` on."""
        ...
