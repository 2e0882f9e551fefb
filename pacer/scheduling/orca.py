"""Iteration-level batching (Orca, OSDI'22): whole prompts join the running decodes each iteration."""

from __future__ import annotations

from pacer.scheduling.base import Scheduler
from pacer.scheduling.registry import register


@register("orca")
class OrcaScheduler(Scheduler):
    """Decodes and whole prompts share an iteration, up to the batch cap (`max_num_seqs`).

    No stall waits for a whole iteration of prefills only, but an iteration holding a long prompt
    is as slow as that prompt: decodes in it see a long gap.
    """

    chunked_prefill = False
