"""AsyncEngine on the tiny model: outputs reach the right caller, closing a stream aborts, limits refuse early."""

from __future__ import annotations

import asyncio

import pytest

from pacer.engine.async_engine import AsyncEngine, QueueFullError
from pacer.request import FinishReason, Request, SamplingParams
from tests.tiny import tiny_engine


def started(**kwargs) -> AsyncEngine:
    engine = AsyncEngine(lambda: tiny_engine(), **kwargs)
    engine.start()
    return engine


def request(rid: str, max_tokens: int = 8) -> Request:
    return Request(rid, [3, 4, 5], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def test_a_build_error_reaches_the_caller_of_start():
    def broken():
        raise FileNotFoundError("no such model")

    with pytest.raises(FileNotFoundError, match="no such model"):
        AsyncEngine(broken).start()


def test_concurrent_calls_get_their_own_outputs_and_equal_the_sync_engine():
    expected = tiny_engine()
    expected.add_request(request("ref", 12))
    ids = []
    while expected.has_unfinished:
        ids += [t for out in expected.step() for t in out.new_token_ids]

    async def collect(engine: AsyncEngine, rid: str) -> tuple[list[int], FinishReason]:
        tokens, reason = [], None
        with engine.generate([request(rid, 12)]) as stream:
            async for output in stream:
                assert output.request_id == rid
                tokens += output.new_token_ids
                reason = output.finish_reason
        return tokens, reason

    async def main():
        engine = started()
        try:
            return await asyncio.gather(*(collect(engine, f"r{i}") for i in range(4)))
        finally:
            await engine.stop()

    for tokens, reason in asyncio.run(main()):
        assert tokens == ids and reason is FinishReason.LENGTH


def test_closing_a_stream_aborts_and_frees_its_blocks():
    async def main():
        engine = started()
        try:
            stream = engine.generate([request("long", 200)])
            await stream.__anext__()
            stream.close()
            for _ in range(200):
                if engine.load.kv_cache_usage == 0 and engine.load.num_running == 0:
                    break
                await asyncio.sleep(0.01)
            return engine.load, engine.num_in_flight
        finally:
            await engine.stop()

    load, in_flight = asyncio.run(main())
    assert load.kv_cache_usage == 0 and load.num_running == 0 and in_flight == 0


def test_limits_refuse_before_anything_is_queued():
    async def main():
        engine = started(max_queued_requests=1)
        try:
            with pytest.raises(ValueError, match="exceed the KV cache capacity"):
                engine.generate([request("huge", 10_000)])
            with pytest.raises(QueueFullError) as refused:
                engine.generate([request("a"), request("b")])
            assert refused.value.retry_after_s >= 1
            assert engine.num_in_flight == 0
        finally:
            await engine.stop()

    asyncio.run(main())
