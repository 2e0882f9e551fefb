"""Prefill-first baseline, as vLLM v0 schedules: waiting prompts run whole and pause the decodes."""

from __future__ import annotations

from pacer.scheduling.base import Scheduler
from pacer.scheduling.registry import register


@register("fcfs")
class FcfsScheduler(Scheduler):
    """An iteration either runs whole prompts (as many as fit) or the decodes, never both.

    Good throughput, but every admitted prompt stalls all running streams for its whole prefill:
    the generation stalls that Sarathi-Serve measures.
    """

    chunked_prefill = False
    prefill_first = True
