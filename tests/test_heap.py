"""The start-up heap freeze: what is alive when serving starts is no longer walked by full collections."""

from __future__ import annotations

import gc
import weakref

from pacer.heap import freeze_startup_heap


class _Node:
    pass


def test_the_startup_heap_leaves_the_collectors_reach_and_garbage_does_not_stay():
    gc.collect()
    alive = [{"state": i} for i in range(1000)]  # what start-up keeps
    cycle = _Node()
    cycle.self = cycle  # garbage only a collection frees
    garbage = weakref.ref(cycle)
    del cycle
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(alive)
        tracked = {id(o) for o in gc.get_objects()}
        assert id(alive) not in tracked and id(alive[0]) not in tracked  # a full pass no longer walks them
        assert garbage() is None  # collected before the freeze, not frozen for good
    finally:
        gc.unfreeze()
