"""Policies by name: the CLI's --scheduler and --router choices come from here."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from pacer.scheduling.base import Scheduler

T = TypeVar("T")


class Registry(dict[str, type[T]], Generic[T]):
    """name -> class, filled by the `register` decorator; a bad name is an error that lists the known ones."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self[name] = cls
            return cls
        return add

    def lookup(self, name: str) -> type[T]:
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}") from None


SCHEDULERS: Registry[Scheduler] = Registry("scheduler")
register = SCHEDULERS.register
scheduler_class = SCHEDULERS.lookup
