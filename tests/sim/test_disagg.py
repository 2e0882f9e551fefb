"""Disaggregated prefill and decode in the simulator: the hand-over's timing, waiting for room, conservation."""

from __future__ import annotations

import json
import random

import pytest

from pacer.cli import main
from pacer.config import SchedulerConfig
from pacer.engine.detokenizer import Detokenizer
from pacer.engine.engine import Engine
from pacer.kv import KVCacheManager
from pacer.request import SLO
from pacer.scheduling import scheduler_class
from pacer.sim.disagg import DecodePool, KVTransfer
from pacer.sim.executor import SimExecutor
from pacer.sim.run import SimConfig, build_simulator
from pacer.sim.simulator import SimRequest, Simulator, VirtualClock
from tests.sim.test_gpu import PROFILES
from tests.sim.test_simulator import constant, linear


def disaggregated(latency, policy: str = "sarathi", prefill: int = 1, decode: int = 1, num_blocks: int = 256,
                  transfer_s_per_token: float = 0.00625, prefix_caching: bool = False, **config) -> Simulator:
    clock = VirtualClock()

    def engine() -> Engine:
        scheduler = scheduler_class(policy)(SchedulerConfig(scheduler=policy, **config),
                                            KVCacheManager(num_blocks, 16, prefix_caching), 4096,
                                            latency=latency.fresh())
        return Engine(scheduler, SimExecutor(latency.fresh()), Detokenizer(None), clock=clock)

    transfer = KVTransfer(1000, 1000 / transfer_s_per_token)
    return Simulator([engine() for _ in range(prefill)], clock, decode=DecodePool([engine() for _ in range(decode)],
                                                                                   transfer))


def test_first_token_on_the_prefill_replica_then_the_transfer_then_decodes():
    """0.1 s an iteration; 8 prompt tokens take 8 x 6.25 ms = 0.05 s to move: first token at 0.1, adopted at
    0.15, then one token per decode iteration."""
    sim = disaggregated(constant(0.1))
    (record,) = sim.run([SimRequest(0, 0.0, 8, 3)])
    assert record.status == "ok" and record.output_tokens == 3
    assert record.token_times_s == pytest.approx([0.1, 0.25, 0.35])
    assert record.server_scheduling_delay_s == 0.0  # the prefill replica's, not the adoption's
    prefill, decode = sim.replicas[0], sim.decode.replicas[0]
    assert (prefill.num_iterations, decode.num_iterations) == (1, 2)
    for replica in sim.all_replicas:
        assert not replica.engine.has_unfinished and not replica.engine.exported
        assert replica.engine.scheduler.kv.num_free_blocks == replica.engine.scheduler.kv.num_blocks


def test_a_later_turn_moves_only_the_blocks_its_decode_replica_lacks():
    """Turn 2's prompt is turn 1's (40 tokens), its 4 answer tokens and 8 more: the decode replica that decoded
    turn 1 is believed to hold (and holds) its prompt's two full 16-token blocks, so 52 - 32 tokens move instead of
    52; without prefix caching all of them do."""
    for prefix_caching, moved in ((True, 52 - 32), (False, 52)):
        sim = disaggregated(constant(0.1), prefix_caching=prefix_caching)
        (first, second) = sim.run([SimRequest(0, 0.0, 40, 4), SimRequest(1, None, 8, 3, turn=1, think_s=1.0)])
        assert first.status == second.status == "ok"
        # first token on the prefill replica, then the transfer, then a decode iteration
        assert second.token_times_s[1] - second.token_times_s[0] == pytest.approx(moved * 0.00625 + 0.1)
        for replica in sim.all_replicas:
            assert replica.engine.scheduler.kv.num_free_blocks == replica.engine.scheduler.kv.num_blocks


def test_a_one_token_request_ends_on_the_prefill_replica():
    sim = disaggregated(constant(0.1))
    (record,) = sim.run([SimRequest(0, 0.0, 8, 1)])
    assert record.token_times_s == pytest.approx([0.1]) and record.finished_s == pytest.approx(0.1)
    assert sim.decode.replicas[0].num_iterations == 0


def test_a_request_waits_for_room_on_the_decode_side_in_arrival_order():
    """One batch slot on the decode replica: the second request's KV arrives at 0.15 but waits until the first
    ends at 0.35; the third, arriving later, still comes after it."""
    sim = disaggregated(constant(0.1), max_num_seqs=1)
    records = sim.run([SimRequest(0, 0.0, 8, 3), SimRequest(1, 0.0, 8, 2), SimRequest(2, 0.25, 8, 2)])
    assert records[0].token_times_s == pytest.approx([0.1, 0.25, 0.35])
    # the prefill replica runs one request at a time too: r1's first token at 0.2, adopted when r0 ends at 0.35
    assert records[1].token_times_s == pytest.approx([0.2, 0.45])
    assert records[2].token_times_s == pytest.approx([0.35, 0.55])
    assert all(r.status == "ok" for r in records)


def test_conservation_with_kv_pressure_on_both_sides():
    """Every request ends exactly once and no block leaks, with preemption and admission in play."""
    sim = disaggregated(linear(), policy="slo", prefill=2, decode=2, num_blocks=24, drop_expired=True)
    rng = random.Random(0)
    slo = SLO(ttft_s=0.5, tbt_s=0.2)
    records = sim.run([SimRequest(i, 0.01 * i, rng.randint(20, 120), rng.randint(1, 150), slo) for i in range(80)])
    assert all(r.finished_s is not None for r in records)
    assert {"ok", "rejected"} <= {r.status for r in records}
    assert sum(r.engine.scheduler.num_preemptions for r in sim.decode.replicas) > 0
    for record in records:
        if record.status == "ok":
            assert len(record.token_times_s) == record.output_tokens == record.max_tokens
    for replica in sim.all_replicas:
        assert not replica.engine.has_unfinished
        assert replica.engine.scheduler.kv.num_free_blocks == replica.engine.scheduler.kv.num_blocks


def test_gpu_profiles_size_the_transfer_from_the_model_shape(tmp_path):
    gpu_profile = str(PROFILES / "sarathi-a100")
    sim = build_simulator(SimConfig(profile=gpu_profile, replicas=4, prefill_replicas=2, kv_transfer_gbps=100),
                          SchedulerConfig(scheduler="slo"), 8192)
    assert (len(sim.replicas), len(sim.decode.replicas)) == (2, 2)
    # Yi-34B: 2 (K, V) x 60 layers x 8 KV heads x 128 x 2 bytes = 245,760 bytes a token; 100 Gbit/s = 12.5 GB/s
    assert sim.decode.transfer.seconds(8192) == pytest.approx(8192 * 245_760 / 12.5e9)
    with pytest.raises(ValueError, match="at least one decode replica"):
        SimConfig(profile=gpu_profile, replicas=2, prefill_replicas=2)
    profile = tmp_path / "profile.json"
    linear().save(profile)
    with pytest.raises(ValueError, match="no known shape"):
        build_simulator(SimConfig(profile=str(profile), kv_blocks=64, replicas=2, prefill_replicas=1),
                        SchedulerConfig(), 4096)


def test_sim_compare_colocated_against_disaggregated(tmp_path):
    out = tmp_path / "compare.json"
    assert main(["sim", "compare", "--profile", str(PROFILES / "sarathi-a100"), "--num-requests", "60", "--rate", "2",
                 "--lengths", "mix", "--length-mix", "0.8:64-512:16-64,0.2:2048-4096:16-64", "--max-model-len", "8192",
                 "--slo-ttft-ms", "5000", "--slo-tbt-ms", "200", "--replicas", "2", "--scheduler", "slo",
                 "--config", "colocated=--router slo", "--config", "1P1D=--prefill-replicas 1 --kv-transfer-gbps 25",
                 "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert runs["1P1D"]["summary"]["num_completed"] == runs["colocated"]["summary"]["num_completed"] == 60


def test_the_prefill_replica_holds_the_kv_until_a_decode_replica_adopts_it():
    """Two blocks a replica (one 20-token prompt's KV): r1 cannot start its prefill while r0's KV waits out its
    transfer (20 x 6.25 ms = 0.125 s) on the prefill replica, so it starts at 0.225, not at 0.1."""
    sim = disaggregated(constant(0.1), num_blocks=2)
    records = sim.run([SimRequest(0, 0.0, 20, 2), SimRequest(1, 0.0, 20, 2)])
    assert records[0].token_times_s == pytest.approx([0.1, 0.325])
    assert records[1].token_times_s == pytest.approx([0.325, 0.55])
    for replica in sim.all_replicas:
        assert replica.engine.scheduler.kv.num_free_blocks == 2


def test_the_prefill_pool_pauses_while_a_hand_over_waits_for_the_decode_pool():
    """Backpressure: one batch slot on the decode replica, taken by r0 until 0.55. r1's KV arrives at 0.25 and
    waits; r2, arriving at 0.3, gets no first token until r1 is adopted (0.55), so its wait shows in its TTFT
    (first token at 0.65, not 0.4) instead of as a stall after its first token."""
    sim = disaggregated(constant(0.1), max_num_seqs=1)
    records = sim.run([SimRequest(0, 0.0, 8, 5), SimRequest(1, 0.0, 8, 2), SimRequest(2, 0.3, 8, 2)])
    assert records[0].token_times_s == pytest.approx([0.1, 0.25, 0.35, 0.45, 0.55])
    assert records[1].token_times_s == pytest.approx([0.2, 0.65])
    assert records[2].token_times_s == pytest.approx([0.65, 0.8])
