"""The seam between scheduling and execution: the real model runner and the simulator both fit it."""

from __future__ import annotations

from typing import Protocol

from pacer.scheduling import ModelOutput, SchedulerOutput


class Executor(Protocol):
    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        """Run one iteration of the plan: compute KV for the scheduled tokens, sample where due."""
        ...
