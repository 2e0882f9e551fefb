"""Scheduling policies by name: the CLI's --scheduler choices come from here."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pacer.scheduling.base import Scheduler

SCHEDULERS: dict[str, type[Scheduler]] = {}


def register(name: str) -> Callable[[type[Scheduler]], type[Scheduler]]:
    def add(cls: type[Scheduler]) -> type[Scheduler]:
        if name in SCHEDULERS:
            raise ValueError(f"scheduler {name!r} registered twice")
        SCHEDULERS[name] = cls
        return cls
    return add


def scheduler_class(name: str) -> type[Scheduler]:
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(sorted(SCHEDULERS))}") from None
