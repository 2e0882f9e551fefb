"""Stall-free batching with chunked prefills (Sarathi-Serve, OSDI'24, §4)."""

from __future__ import annotations

from pacer.scheduling.base import Scheduler
from pacer.scheduling.registry import register


@register("sarathi")
class SarathiScheduler(Scheduler):
    """Running decodes first, then ongoing prefill chunks, then new prompts, each chunk
    `min(remaining prompt, budget left)`: iteration time stays bounded by the token budget, so
    decodes never wait behind a long prompt.
    """

    chunked_prefill = True
