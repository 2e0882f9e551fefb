"""Scheduling: the shared loop (base), the plan it returns, and the policies registered by name."""

from pacer.scheduling import fcfs, orca, sarathi, slo  # noqa: F401  (register the built-in policies)
from pacer.scheduling.base import ModelOutput, Scheduler, SchedulerOutput, TokenLogprobs
from pacer.scheduling.registry import SCHEDULERS, register, scheduler_class

__all__ = ["SCHEDULERS", "ModelOutput", "Scheduler", "SchedulerOutput", "TokenLogprobs", "register",
           "scheduler_class"]
