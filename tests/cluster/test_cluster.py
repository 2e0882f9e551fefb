"""Replicas on Ray: routing, streaming, usage, a replica killed under load, and the slo router's choice.

Two replicas of the tiny model with one thread each, in the Ray runtime of the `ray_address` fixture.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pacer.cluster.host import ray_frontend
from pacer.cluster.replica import Replica
from pacer.config import ClusterConfig, EngineConfig
from pacer.engine.frontend import Frontend
from pacer.engine.handle import ReplicaState
from pacer.engine.protocol import Add, EngineError
from pacer.llm import LLM
from pacer.request import SLO, Request, SamplingParams
from pacer.scheduling.admission import QueueState
from tests.live_server import run_server
from tests.server.test_errors import check_error

PROMPT = [5, 6, 7, 8, 9]


def request(request_id: str, max_tokens: int, prompt: list[int] = PROMPT, slo: SLO | None = None) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                   slo or SLO(), arrival_s=time.monotonic())


async def collect(cluster: Frontend, req: Request, first_token: asyncio.Event | None = None) -> list[int] | str:
    """The request's token ids, or the message of the error that ended its stream."""
    tokens: list[int] = []
    try:
        with cluster.generate([req]) as stream:
            async for output in stream:
                tokens += output.new_token_ids
                if tokens and first_token is not None:
                    first_token.set()
    except EngineError as error:
        return str(error)
    return tokens


def test_server_routes_streams_and_counts_usage_across_replicas(tiny_model_dir, ray_address, tmp_path):
    flags = ["--replicas", "2", "--threads-per-replica", "1", "--ray-address", ray_address, "--router",
             "least_tokens", "--num-blocks", "64", "--max-num-seqs", "4"]
    with run_server(tiny_model_dir, *flags, log_dir=tmp_path) as server:
        health = httpx.get(server.url + "/health").json()
        assert [r["state"] for r in health["replicas"]] == ["up", "up"]

        def complete(i: int) -> dict:
            body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            return httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(complete, range(8)))
        assert all(r["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17,
                              "prompt_tokens_details": {"cached_tokens": 0}} for r in results)
        assert len({r["choices"][0]["text"] for r in results}) == 1  # greedy: the same text from either replica

        body = {"prompt": PROMPT, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}
        events = [line[6:] for line in httpx.post(server.url + "/v1/completions", json=body, timeout=60).text
                  .splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 6

        # bad input is refused by the front end, before any replica sees it
        check_error(httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": -1}), 400)
        check_error(httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT * 60, "max_tokens": 8}), 400)
        check_error(httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "ttft_slo_ms": -5}), 400)
        # a client that leaves mid-stream: its request is aborted on its replica, which frees its blocks
        body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            next(response.iter_lines())
        deadline = time.monotonic() + 30
        while not (samples := server.metrics()).get('pacer:request_success_total{finished_reason="abort"}'):
            assert time.monotonic() < deadline, "the request of a client that left was not aborted"
            time.sleep(0.05)
        assert samples["pacer:generation_tokens_total"] < 8 * 12 + 6 + 200
        assert all(samples[f'pacer:replica_kv_cache_usage_perc{{replica="{i}"}}'] == 0 for i in range(2))

        routed = [samples[f'pacer:replica_requests_routed_total{{replica="{i}"}}'] for i in range(2)]
        assert sum(routed) == 10 and min(routed) >= 2  # least_tokens spread the concurrent calls
        assert samples['pacer:replica_up{replica="0"}'] == samples['pacer:replica_up{replica="1"}'] == 1


def test_a_killed_replica_reroutes_unstarted_requests_fails_started_streams_and_rejoins(tiny_model_dir,
                                                                                         ray_address):
    config = EngineConfig.from_kwargs(model=str(tiny_model_dir), num_blocks=64, max_num_seqs=1)
    cluster = ray_frontend(config, ClusterConfig(replicas=2, threads_per_replica=1, router="round_robin",
                                                  ray_address=ray_address))
    cluster.start()

    async def main() -> None:
        cluster.start()
        # round robin: three requests on each replica, one running at a time (which one: Ray's choice)
        tasks = [asyncio.create_task(collect(cluster, request(f"r{i}", 150))) for i in range(6)]
        on_zero = []
        while not any(flight.started for flight in on_zero):
            await asyncio.sleep(0.002)
            on_zero = [f for f in cluster._flights.values() if f.replica == 0]
        os.kill(cluster.replicas[0].info.pid, signal.SIGKILL)  # as the OOM killer would
        started = {f.request.request_id for f in on_zero if f.started}
        results = dict(zip((f"r{i}" for i in range(6)), await asyncio.gather(*tasks)))
        assert len(on_zero) == 3 and len(started) == 1
        assert all("engine replica 0 died while serving this request" in results[rid] for rid in started)
        finished = [tokens for rid, tokens in results.items() if rid not in started]
        assert all(isinstance(tokens, list) and len(tokens) == 150 for tokens in finished)  # 2 moved to replica 1
        assert cluster.num_rerouted == 2 and cluster.num_in_flight == 0
        assert len({tuple(tokens) for tokens in finished}) == 1

        deadline = time.monotonic() + 120
        while cluster.replicas[0].state is not ReplicaState.UP and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert cluster.health()["replicas"][0] | {"running": 0, "waiting": 0} == {
            "replica": 0, "state": "up", "restarts": 1, "running": 0, "waiting": 0}
        again = await asyncio.gather(*[collect(cluster, request(f"s{i}", 10)) for i in range(2)])
        assert again == [finished[0][:10]] * 2  # both replicas serve again, with the same ids
        assert cluster.replicas[0].num_routed == 3 + 1 and cluster.replicas[1].num_routed == 3 + 2 + 1
        await cluster.stop()

    asyncio.run(main())


def test_slo_router_sends_a_request_to_the_replica_with_the_shorter_predicted_ttft(tiny_model_dir, tiny_profile,
                                                                                   ray_address):
    config = EngineConfig.from_kwargs(model=str(tiny_model_dir), num_blocks=64, scheduler="slo",
                                      latency_profile=str(tiny_profile), max_num_batched_tokens=32)
    cluster = ray_frontend(config, ClusterConfig(replicas=2, threads_per_replica=1, router="slo",
                                                  ray_address=ray_address))
    cluster.start()

    async def main() -> None:
        cluster.start()
        busy, idle = cluster.replicas
        # Load replica 0 directly (not through the router) with long prompts due before the probe, then route it.
        queued = asyncio.Queue()
        cluster._send(busy, [request(f"long{i}", 4, prompt=[5] * 200, slo=SLO(ttft_s=10.0)) for i in range(4)],
                      queued)
        probe = request("probe", 4, slo=SLO(ttft_s=30.0))
        assert busy.predicted_ttft_s(probe) > idle.predicted_ttft_s(probe)
        assert await collect(cluster, probe) != []
        assert (busy.num_routed, idle.num_routed) == (4, 1)
        for _ in range(4):
            while not (await queued.get()).finished:
                pass
        await cluster.stop()

    asyncio.run(main())


def test_disaggregated_prefill_and_decode_give_the_colocated_ids(tiny_model_dir, ray_address):
    config = EngineConfig.from_kwargs(model=str(tiny_model_dir), num_blocks=64)
    local = LLM(config=config)
    prompts = [[5, 6, 7, 8, 9], list(range(20, 90)), [3] * 33]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = [r.token_ids for r in local.generate(prompts, greedy, use_tqdm=False)]
    follow_up = prompts[1] + expected[1] + [4] * 10  # its first 64 tokens' KV is on the decode replica already
    expected_follow_up = local.generate([follow_up], greedy, use_tqdm=False)[0].token_ids
    cluster = ray_frontend(config, ClusterConfig(replicas=2, prefill_replicas=1, threads_per_replica=1,
                                                  ray_address=ray_address))
    cluster.start()

    async def main() -> None:
        cluster.start()
        results = await asyncio.gather(*[collect(cluster, request(f"d{i}", 24, prompt=p))
                                         for i, p in enumerate(prompts)])
        assert results == expected
        prefill, decode = cluster.replicas
        assert (prefill.num_routed, decode.num_routed) == (3, 3)  # every request went through both
        one = await collect(cluster, request("one", 1))  # nothing to hand over
        assert one == expected[0][:1] and decode.num_routed == 3
        assert decode.sent.cached_prompt_tokens(request("f", 24, prompt=follow_up)) == 64  # 70 tokens sent: 4 blocks
        assert await collect(cluster, request("f", 24, prompt=follow_up)) == expected_follow_up  # 64 tokens not sent
        await cluster.stop()

    asyncio.run(main())


def test_a_replica_whose_engine_loop_dies_exits_so_that_ray_restarts_it(tiny_model_dir, ray_address):
    """A scheduler bug ends the replica's engine loop. A replica without one must not look alive (its calls would
    queue forever): it exits, its stream ends with an error (the front end's cue to re-route or fail), and Ray
    restarts it."""
    import ray

    class BuggyReplica(Replica):
        def _receive(self, block: bool) -> list:
            commands = super()._receive(block)
            if any(isinstance(c, Add) and c.requests[0].request_id == "bug" for c in commands):
                raise RuntimeError("a scheduler bug")
            return commands

    config = EngineConfig.from_kwargs(model=str(tiny_model_dir), num_blocks=64, threads=1)
    actor = ray.remote(BuggyReplica).options(num_cpus=1, max_restarts=1).remote(config)

    async def tokens_until_finished(stream) -> list[int]:
        tokens: list[int] = []
        async for ref in stream:
            update = await ref
            tokens += [t for output in update.outputs for t in output.new_token_ids]
            if any(output.finished for output in update.outputs):
                return tokens
        raise AssertionError("the stream ended")

    async def main() -> None:
        first = await actor.ready.remote()
        stream = actor.updates.options(num_returns="streaming").remote()
        await actor.submit.remote([request("ok", 4)], [0.0])
        assert len(await tokens_until_finished(stream)) == 4
        with pytest.raises(ray.exceptions.RayError):  # the submit's reply itself may not make it out
            await actor.submit.remote([request("bug", 4)], [0.0])
            await tokens_until_finished(stream)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                again = await actor.ready.remote()
                break
            except ray.exceptions.RayError:
                await asyncio.sleep(0.2)
        assert again.pid != first.pid  # (that a restarted replica serves again: the killed-replica test)
        ray.kill(actor)

    asyncio.run(main())


def test_a_replica_out_of_restarts_is_dead_and_the_others_serve_on(tiny_model_dir, ray_address):
    config = EngineConfig.from_kwargs(model=str(tiny_model_dir), num_blocks=64)
    cluster = ray_frontend(config, ClusterConfig(replicas=2, threads_per_replica=1, router="round_robin",
                                                  max_restarts=0, ray_address=ray_address))
    cluster.start()

    async def main() -> None:
        cluster.start()
        os.kill(cluster.replicas[1].info.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while cluster.replicas[1].state is not ReplicaState.DEAD and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert [r["state"] for r in cluster.health()["replicas"]] == ["up", "dead"] and cluster.is_alive
        results = await asyncio.gather(*[collect(cluster, request(f"q{i}", 5)) for i in range(3)])
        assert all(len(tokens) == 5 for tokens in results) and cluster.replicas[0].num_routed == 3
        await cluster.stop()

    asyncio.run(main())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"replicas": 0}, "replicas must be at least 1"),
    ({"replicas": 2, "threads_per_replica": 0}, "threads_per_replica must be at least 1"),
    ({"replicas": 2, "max_restarts": -1}, "max_restarts must be >= 0"),
    ({"replicas": 2, "prefill_replicas": 2}, "needs at least one decode replica"),
    ({"replicas": 2, "prefill_replicas": -1}, "prefill_replicas must be in"),
])
def test_cluster_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig(**kwargs)


def test_a_bad_router_name_fails_before_ray_starts():
    with pytest.raises(ValueError, match="router"):
        ray_frontend(EngineConfig(), ClusterConfig(replicas=2, router="fastest"))


class RecordingHost:
    """A host that records what it is sent (no Ray here)."""

    restarts = True

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, command) -> None:
        self.sent.append(command)

    def take_kv(self, request_id: str, num_held_tokens: int) -> str:
        return f"kv-{request_id}"

    def cached_prompt_tokens(self, request) -> None:
        return None


def recording_frontend(num_replicas: int, prefill_replicas: int = 0) -> Frontend:
    from pacer.engine.protocol import EngineLoad, Ready
    from tests.scheduling.test_slo import slo_scheduler

    scheduler = slo_scheduler()  # 10 ms + 1 ms a token
    frontend = Frontend([RecordingHost() for _ in range(num_replicas)], prefill_replicas=prefill_replicas)
    for replica in frontend.replicas:
        replica.rejoin(Ready(scheduler.limits, scheduler.latency, QueueState(scheduler.snapshot(), 0), EngineLoad(),
                             4096, 0, "host"))
    frontend.limits = scheduler.limits
    return frontend


def test_hand_overs_count_on_their_decode_replica_until_it_reports():
    """Two prompts prefilled between two load updates go to different decode replicas: the first one's tokens
    count on its target from the moment it is sent."""
    from pacer.engine.frontend import _Flight
    from pacer.engine.protocol import Abort, Adopt
    from pacer.request import RequestOutput

    cluster = recording_frontend(3, prefill_replicas=1)
    for rid in ("a", "b"):
        flight = _Flight(request(rid, max_tokens=50), asyncio.Queue(), replica=0, handoff=True)
        cluster._flights[rid] = flight
        cluster._hand_over(cluster.replicas[0], flight, RequestOutput(rid, [11], "x", finished=False))
    sent = [r.host.sent for r in cluster.replicas]
    assert [len(s) for s in sent] == [0, 1, 1] and isinstance(sent[1][0], Adopt) and sent[1][0].payload == "kv-a"
    assert cluster.replicas[1].num_outstanding_tokens == 49  # 50 to generate, one came from the prefill
    # the client of "a" leaves: the abort goes to its decode replica
    cluster.abort(["a"])
    assert sent[1][-1] == Abort(["a"])


def test_admission_across_replicas_plans_with_the_prefix_each_is_believed_to_hold():
    """A follow-up whose prompt extends one sent to replica 1 is predicted there with its hit (the front end cannot
    read a replica's KV: it believes what it sent, in 16-token blocks), so it is admitted there rather than refused
    for a prefill that replica will skip; a replica that restarts is believed to hold nothing."""
    from pacer.scheduling.admission import SLOUnattainable
    from pacer.scheduling.router import RoundRobinRouter, dispatch
    from tests.scheduling.test_slo import slo_scheduler

    cluster = recording_frontend(2)
    cold, warm = cluster.replicas
    history = list(range(100, 420))  # 320 tokens: 20 blocks
    cluster._send(warm, [request("turn1", 8, prompt=history)], asyncio.Queue())
    warm.queue.latest = QueueState(slo_scheduler().snapshot(), 1)  # the replica took it in and is idle again
    now = time.monotonic()
    follow_up = request("turn2", 8, prompt=history + [7] * 20, slo=SLO(ttft_s=0.2))
    assert warm.sent.cached_prompt_tokens(follow_up) == 320
    assert warm.predicted_ttft_s(follow_up) < 0.2 < cold.predicted_ttft_s(follow_up)  # 20 tokens to prefill, or 340
    with pytest.raises(SLOUnattainable):
        dispatch([follow_up], [cold], RoundRobinRouter(), now)
    assert dispatch([follow_up], [cold, warm], RoundRobinRouter(), now) == 1  # the router's pick missed: overridden
    assert follow_up.num_cached_tokens == 0  # a query never changes the request; sending it there does
    warm.rejoin(warm.info)
    assert warm.sent.cached_prompt_tokens(follow_up) == 0


def test_one_calls_choices_are_admitted_together_on_one_replica():
    """`n` choices of one call go to one replica, each admitted behind the ones before it: a TTFT SLO that the
    first meets but the third, queued behind two 300-token prefills, would miss refuses the whole call."""
    from pacer.engine.protocol import Add
    from pacer.scheduling.admission import SLOUnattainable

    cluster = recording_frontend(2)

    async def main() -> None:
        prompt = list(range(300))
        choices = [request(f"n{i}", 8, prompt=prompt, slo=SLO(ttft_s=0.5)) for i in range(3)]
        with pytest.raises(SLOUnattainable):
            cluster.generate(choices)  # ~0.31 s, ~0.62 s, ~0.93 s: the third misses
        assert not any(r.host.sent for r in cluster.replicas) and cluster.num_in_flight == 0
        stream = cluster.generate(choices[:1] + [request("n1b", 8, prompt=prompt, slo=SLO(ttft_s=0.7))])
        commands = [command for r in cluster.replicas for command in r.host.sent]
        assert len(commands) == 1 and isinstance(commands[0], Add) and len(commands[0].requests) == 2
        stream.close()

    asyncio.run(main())
