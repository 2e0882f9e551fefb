"""The engine loop in a process of its own (`ProcessHost`) on the tiny model: the same outputs as the engine thread,
aborts free its blocks, and its death fails the requests in flight instead of leaving them hanging."""

from __future__ import annotations

import asyncio
import functools
import os
import signal

import pytest

from pacer.engine.frontend import Frontend
from pacer.engine.hosts import ProcessHost
from pacer.engine.protocol import EngineError, QueueFullError
from pacer.request import FinishReason
from tests.engine.test_frontend import broken, collect, request, sync_ids
from tests.tiny import tiny_engine


def test_a_build_error_in_the_engine_process_reaches_the_caller_of_start():
    with pytest.raises(FileNotFoundError, match="no such model"):
        Frontend([ProcessHost(broken)]).start()


def test_outputs_aborts_and_limits_as_the_engine_thread():
    ids = sync_ids(12)

    async def main():
        engine = Frontend([ProcessHost(functools.partial(tiny_engine))], max_queued_requests=4)
        engine.start()
        try:
            results = await asyncio.gather(*(collect(engine, f"r{i}", 12) for i in range(4)))
            with pytest.raises(ValueError, match="exceed the KV cache capacity"):
                engine.generate([request("huge", 10_000)])
            with pytest.raises(QueueFullError):
                engine.generate([request(f"q{i}") for i in range(5)])
            stream = engine.generate([request("long", 200)])
            await stream.__anext__()
            stream.close()  # the client went away: the engine process aborts it and frees its blocks
            for _ in range(500):
                if engine.load.kv_cache_usage == 0 and engine.load.num_running == 0 and not engine.num_in_flight:
                    break
                await asyncio.sleep(0.01)
            return results, engine.load, engine.num_in_flight
        finally:
            await engine.stop()

    results, load, in_flight = asyncio.run(main())
    for tokens, reason in results:
        assert tokens == ids and reason is FinishReason.LENGTH
    assert load.kv_cache_usage == 0 and load.num_running == 0 and in_flight == 0


def test_a_dead_engine_process_without_restarts_fails_the_requests_in_flight():
    async def main():
        engine = Frontend([ProcessHost(functools.partial(tiny_engine), max_restarts=0)])
        engine.start()
        try:
            stream = engine.generate([request("doomed", 200)])
            await stream.__anext__()
            os.kill(engine.replicas[0].info.pid, signal.SIGKILL)  # as the OOM killer would
            with pytest.raises(EngineError, match="engine process ended"):
                async for _ in stream:
                    pass
            assert not engine.is_alive and engine.num_in_flight == 0
            with pytest.raises(EngineError, match="not running"):
                engine.generate([request("late")])
        finally:
            await engine.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_admission_in_front_of_an_engine_process_predicts_the_prefix_it_sent_as_cached():
    """The front end cannot read the child's KV: it believes a prompt it sent is cached there (in 16-token blocks),
    as the engine then finds it; with no prefix cache in the child it believes nothing."""
    from pacer.request import Request, SamplingParams

    def prompt(rid: str, tail: int) -> Request:
        return Request(rid, list(range(10, 50)) + [tail], SamplingParams(max_tokens=2, ignore_eos=True))

    async def main(prefix_caching: bool) -> list[int]:
        engine = Frontend([ProcessHost(functools.partial(tiny_engine, prefix_caching=prefix_caching))])
        engine.start()
        try:
            hints = []
            for i, tail in enumerate((60, 61)):
                first = prompt(f"r{i}", tail)
                async for _ in engine.generate([first]):
                    pass
                hints.append(first.num_cached_tokens)  # what admission predicted
            return hints
        finally:
            await engine.stop()

    assert asyncio.run(main(True)) == [0, 32]  # the 40 shared tokens hold two full 16-token blocks
    assert asyncio.run(main(False)) == [0, 0]


def test_a_killed_engine_process_restarts_and_serves_the_requests_it_had_not_started():
    """kill -9 the engine process with one request streaming and two queued behind it (one batch slot): the streaming
    one ends with an error, the queued ones are held, sent to the restarted process, and finish with the ids the
    engine gives them; nothing is lost, and the front end serves on."""
    ids = sync_ids(12)

    async def main():
        engine = Frontend([ProcessHost(functools.partial(tiny_engine, max_num_seqs=1), max_restarts=1)])
        engine.start()
        try:
            first = engine.generate([request("streaming", 200)])
            await first.__anext__()
            queued = [asyncio.create_task(collect(engine, f"q{i}", 12)) for i in range(2)]
            await asyncio.sleep(0.1)  # both sent, neither started: the batch slot is taken
            pid = engine.replicas[0].info.pid
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(EngineError, match="engine process ended"):
                async for _ in first:
                    pass
            results = await asyncio.wait_for(asyncio.gather(*queued), 120)
            assert engine.is_alive and engine.replicas[0].info.pid != pid and engine.replicas[0].num_restarts == 1
            assert engine.num_rerouted == 2 and engine.num_in_flight == 0
            return results, await collect(engine, "after", 12)
        finally:
            await engine.stop()

    results, after = asyncio.run(main())
    assert results == [(ids, FinishReason.LENGTH)] * 2 and after == (ids, FinishReason.LENGTH)
