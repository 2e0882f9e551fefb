"""The front end of one engine thread on the tiny model: outputs reach the right caller, closing a stream aborts,
limits refuse early; and the engine loop behind it holds hand-overs back until it has room."""

from __future__ import annotations

import asyncio

import pytest

from pacer.engine.engine import Engine
from pacer.engine.frontend import Frontend
from pacer.engine.hosts import ThreadHost
from pacer.engine.loop import EngineLoop
from pacer.engine.protocol import Adopt, EngineLoad, EngineUpdate, QueueFullError, Stop
from pacer.request import FinishReason, Request, RequestOutput, SamplingParams
from pacer.scheduling.admission import QueueState
from tests.tiny import tiny_engine, tiny_model


def started(**kwargs) -> Frontend:
    frontend = Frontend([ThreadHost(lambda: tiny_engine())], **kwargs)
    frontend.start()
    return frontend


def request(rid: str, max_tokens: int = 8) -> Request:
    return Request(rid, [3, 4, 5], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def broken() -> Engine:
    """A build that fails (module-level, so an engine process can be handed it)."""
    raise FileNotFoundError("no such model")


def sync_ids(max_tokens: int) -> list[int]:
    """What the plain Engine generates for `request(..., max_tokens)`: what every served engine must stream."""
    engine = tiny_engine()
    engine.add_request(request("ref", max_tokens))
    ids = []
    while engine.has_unfinished:
        ids += [t for out in engine.step() for t in out.new_token_ids]
    return ids


async def collect(engine: Frontend, rid: str, max_tokens: int) -> tuple[list[int], FinishReason]:
    """One call's tokens and finish reason."""
    tokens, reason = [], None
    with engine.generate([request(rid, max_tokens)]) as stream:
        async for output in stream:
            assert output.request_id == rid
            tokens += output.new_token_ids
            reason = output.finish_reason
    return tokens, reason


def test_a_build_error_reaches_the_caller_of_start():
    with pytest.raises(FileNotFoundError, match="no such model"):
        Frontend([ThreadHost(broken)]).start()


def test_concurrent_calls_get_their_own_outputs_and_equal_the_sync_engine():
    ids = sync_ids(12)

    async def main():
        engine = started()
        try:
            return await asyncio.gather(*(collect(engine, f"r{i}", 12) for i in range(4)))
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


def test_a_full_decode_engine_holds_hand_overs_back_until_it_has_room():
    """Disaggregated serving: with one batch slot, a second prefilled request waits for the first to end instead
    of failing, and both finish with all their tokens, in arrival order."""
    model = tiny_model()

    def prefilled(rid: str) -> Adopt:
        prefill = tiny_engine(model=model)
        first = Request(rid, [3, 4, 5, 6], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
                        export_kv=True)
        prefill.add_request(first)
        while prefill.has_unfinished:
            prefill.step()
        request = Request(rid, [3, 4, 5, 6], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        request.token_ids.append(first.output_token_ids[0])
        request.num_computed_tokens = 4
        return Adopt(request, prefill.exported.pop(rid))

    loop = EngineLoop(tiny_engine(model=model, max_num_seqs=1), latency_every_s=None)
    inbox = [[prefilled("a"), prefilled("b")]]  # both arrive back to back
    updates: list[EngineUpdate] = []

    def receive(block: bool) -> list:
        if inbox:
            return inbox.pop()
        assert not block or any(o.finished and o.request_id == "b" for u in updates for o in u.outputs)
        return [Stop()] if block else []

    loop.serve(receive, updates.append)
    outputs = [o for u in updates for o in u.outputs]
    assert all(isinstance(o, RequestOutput) for o in outputs), outputs
    assert [o.request_id for o in outputs if o.finished] == ["a", "b"]
    assert {rid: sum(len(o.new_token_ids) for o in outputs if o.request_id == rid) for rid in "ab"} == {"a": 5, "b": 5}
    # while "b" waited, the load counted it: "a" alone never has more than 5 tokens to go
    assert max(u.load.num_outstanding_tokens for u in updates) > 5
    assert updates[-1].load.num_running == 0 and updates[-1].load.kv_cache_usage == 0
    assert updates[-1].queue.num_taken == 2  # both hand-overs counted as taken in, as submitted requests are


def test_an_update_absorbs_a_later_one_keeping_its_latest_state():
    """A Ray replica whose stream fell behind sends its queued updates as one: everything they carried, in order,
    with the latest state, and the latency model if either had one."""
    def output(rid: str) -> RequestOutput:
        return RequestOutput(rid, [1], "x", finished=False)

    model = object()
    first = EngineUpdate([output("a")], load=EngineLoad(num_running=1), queue=QueueState(None, 1), latency=model)
    first.absorb(EngineUpdate([output("b"), output("c")], load=EngineLoad(num_running=2), queue=QueueState(None, 3)))
    assert [o.request_id for o in first.outputs] == ["a", "b", "c"]
    assert first.load.num_running == 2 and first.queue == QueueState(None, 3) and first.latency is model
    newer = object()
    first.absorb(EngineUpdate(latency=newer))
    assert first.latency is newer


def test_prefill_only_replicas_need_hosts_that_hand_requests_over():
    with pytest.raises(ValueError, match="hand requests over"):
        Frontend([ThreadHost(tiny_engine), ThreadHost(tiny_engine)], prefill_replicas=1)
