"""Scheduling, pure (`now` injected, no torch): the shared loop (base) and the plan it returns, the policies and
routers registered by name, admission control, and the decisions of a prefill/decode hand-over."""

from pacer.scheduling import fcfs, orca, sarathi, slo  # noqa: F401  (register the built-in policies)
from pacer.scheduling.base import ModelOutput, Scheduler, SchedulerOutput, TokenLogprobs
from pacer.scheduling.registry import SCHEDULERS, register, scheduler_class

__all__ = ["SCHEDULERS", "ModelOutput", "Scheduler", "SchedulerOutput", "TokenLogprobs", "register",
           "scheduler_class"]
