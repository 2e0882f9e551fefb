"""The load client against a scripted aiohttp server: SSE split anywhere across reads, and every failure by kind."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from pacer.bench.client import ClientConfig, LoadClient
from pacer.bench.metrics import RequestRecord, SLOTargets, summarize
from pacer.bench.workload import BenchRequest


def _event(payload: dict | str) -> bytes:
    return b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode() + b"\n\n"


TOKEN = _event({"choices": [{"index": 0, "text": "a", "finish_reason": None}]})
DONE = _event("[DONE]")


def _usage(n: int) -> bytes:
    return _event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n}})


def _merged(text: str, so_far: int | None = None) -> bytes:
    """One chunk carrying `text` (several tokens), with the usage so far if given."""
    usage = {"usage": {"prompt_tokens": 1, "completion_tokens": so_far}} if so_far is not None else {}
    return _event({"choices": [{"index": 0, "text": text, "finish_reason": None}]} | usage)


# prompt -> the writes the server makes (None: pause 20 ms between writes)
SCRIPTS: dict[str, list[bytes | None]] = {
    # one event split mid-line over three writes, then two events in one write
    "split": [TOKEN[:9], None, TOKEN[9:20], None, TOKEN[20:], None, TOKEN + TOKEN, _usage(3) + DONE],
    "garbage": [TOKEN, b"data: {not json\n\n", DONE],
    "no-done": [TOKEN, _usage(1)],
    "over-usage": [TOKEN, TOKEN, TOKEN, _usage(2), DONE],
    "under-usage": [TOKEN, _usage(3), DONE],
    "error-event": [TOKEN, _event({"error": {"message": "engine failed", "code": 500}})],
    # a server that falls behind merges tokens into one chunk: with the usage so far in each chunk (vLLM's
    # continuous_usage_stats) ...
    "merged-usage": [_merged("a", 1), None, _merged("b c d", 4), None, _merged("e f", 6), _usage(6) + DONE],
    # ... and without it (counted by tokenizing the chunk's text)
    "merged-text": [_merged("a"), None, _merged("b c d"), None, _merged("e f"), _usage(6) + DONE],
}


SEEN_HEADERS: list[dict[str, str]] = []
SEEN_BODIES: list[dict] = []


async def _completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    SEEN_BODIES.append(body)
    prompt = body["prompt"].rsplit("|", 1)[-1]  # a later turn: the script is its new message's
    SEEN_HEADERS.append({k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-slo")})
    if prompt == "busy":
        return web.json_response({"error": {"message": "busy"}}, status=429, headers={"Retry-After": "7"})
    if prompt == "broken":
        return web.json_response({"error": {"message": "boom"}}, status=500)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for write in SCRIPTS[prompt]:
        if write is None:
            await asyncio.sleep(0.02)
        else:
            await response.write(write)
    return response


async def _run(prompts: list[str], slo: SLOTargets | None = None, classes: list[str | None] | None = None,
               turns: list[int] | None = None) -> list[RequestRecord]:
    app = web.Application()
    app.router.add_post("/v1/completions", _completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        client = LoadClient(ClientConfig(base_url=f"http://127.0.0.1:{port}", model="scripted"), slo=slo,
                            count_tokens=lambda text: len(text.split()))
        classes = classes or [None] * len(prompts)
        turns = turns or [0] * len(prompts)
        requests = [BenchRequest(i, None if turn else 0.0, prompt, 1, 3, c, turn, think_s=0.05 * turn)
                    for i, (prompt, c, turn) in enumerate(zip(prompts, classes, turns))]
        return await client.run(requests)
    finally:
        await runner.cleanup()


def test_sse_split_across_reads_is_reassembled():
    (record,) = asyncio.run(_run(["split"]))
    assert record.status == "ok" and record.output_tokens == 3 and len(record.token_times_s) == 3
    # the first token came after two 20 ms pauses; the last two arrived in one read
    assert record.token_times_s[0] - record.sent_s >= 0.035
    assert record.token_times_s[1] == record.token_times_s[2] <= record.finished_s


def test_every_failure_is_recorded_by_kind():
    prompts = ["garbage", "no-done", "error-event", "busy", "broken"]
    records = {prompt: r for prompt, r in zip(prompts, asyncio.run(_run(prompts)))}
    assert {p: (r.status, r.error_kind) for p, r in records.items()} == {
        "garbage": ("failed", "malformed_sse"), "no-done": ("failed", "malformed_sse"),
        "error-event": ("failed", "http_5xx"), "busy": ("rejected", "http_429"), "broken": ("failed", "http_5xx")}
    assert records["busy"].retry_after_s == 7.0 and records["busy"].finished_s >= records["busy"].sent_s
    assert "engine failed" in records["error-event"].error and "not JSON" in records["garbage"].error


def test_the_runs_slo_travels_as_headers():
    SEEN_HEADERS.clear()
    asyncio.run(_run(["split"], slo=SLOTargets(ttft_s=2.5, tbt_s=0.2)))
    asyncio.run(_run(["split"], slo=SLOTargets(ttft_s=None, tbt_s=0.05)))
    # judged on TPOT, promised TPOT
    asyncio.run(_run(["split"], slo=SLOTargets(ttft_s=3.0, tbt_s=0.2, tbt_stat="mean")))
    asyncio.run(_run(["split"]))
    assert SEEN_HEADERS == [{"x-slo-ttft-ms": "2500", "x-slo-tbt-ms": "200"}, {"x-slo-tbt-ms": "50"},
                            {"x-slo-ttft-ms": "3000", "x-slo-tpot-ms": "200"}, {}]


def test_a_requests_class_slo_travels_with_it():
    from pacer.bench.metrics import parse_slo_classes

    SEEN_HEADERS.clear()
    slo = SLOTargets(ttft_s=9.0, classes=parse_slo_classes("fast:0.5:300:50,slow:0.5:20000:-"))
    records = asyncio.run(_run(["split", "split"], slo=slo, classes=["fast", "slow"]))
    assert sorted(SEEN_HEADERS, key=len) == [{"x-slo-ttft-ms": "20000"}, {"x-slo-ttft-ms": "300", "x-slo-tbt-ms": "50"}]
    assert [r.slo_class for r in records] == ["fast", "slow"]


def test_a_chunk_carrying_several_tokens_is_timed_as_that_many_tokens():
    SEEN_BODIES.clear()
    with_usage, without_usage = asyncio.run(_run(["merged-usage", "merged-text"]))
    assert SEEN_BODIES[0]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    for record in (with_usage, without_usage):
        times = record.token_times_s
        assert record.status == "ok" and record.output_tokens == 6 and len(times) == 6
        assert record.token_count_error is None
        # 1 token, then 3 in one chunk 20 ms later, then 2: the gaps inside a chunk are 0, not one long gap
        assert times[1] == times[2] == times[3] and times[4] == times[5]
        assert times[1] - times[0] >= 0.015 and times[4] - times[3] >= 0.015


def test_token_counts_off_the_final_usage_are_flagged_both_ways():
    over, under = asyncio.run(_run(["over-usage", "under-usage"]))
    assert (over.status, over.token_count_error) == ("ok", 1)  # 3 content chunks, usage says 2
    assert (under.status, under.token_count_error) == ("ok", -2)  # 1 content chunk, usage says 3
    summary = summarize([over, under], SLOTargets(), duration_s=1.0)
    assert summary.num_token_count_mismatch == 2


def test_a_conversations_turns_carry_the_exchange_so_far_and_end_at_a_refusal():
    SEEN_BODIES.clear()
    prompts = ["|split", "|split", "|split", "|split", "|busy", "|split"]
    records = asyncio.run(_run(prompts, turns=[0, 1, 2, 0, 1, 2]))
    sent = {body["prompt"] for body in SEEN_BODIES}
    # each later turn: the turns before, each followed by its answer ("a" x 3), then its own message
    assert {"|split", "|splitaaa|split", "|splitaaa|splitaaa|split", "|splitaaa|busy"} == sent
    assert len(SEEN_BODIES) == 5  # the turn after the refusal is never sent
    assert [(r.turn, r.status) for r in records] == [(0, "ok"), (1, "ok"), (2, "ok"), (0, "ok"), (1, "rejected"),
                                                     (2, "rejected")]
    assert records[5].error_kind == "conversation_ended" and records[5].sent_s is None
    # sent a think time after the answer before it, and timed from then
    assert records[1].sent_s - records[0].finished_s >= 0.045
    assert records[1].scheduled_s <= records[1].sent_s < records[1].scheduled_s + 0.01
    assert records[2].num_prompt_tokens == 1  # as the server's usage counted it
    summary = summarize(records, SLOTargets(), duration_s=1.0)
    assert summary.ttft_later_turns_s["p50"] > 0 and summary.num_rejected == 2
