"""Routing policies on fabricated replica views, and the slo router inside the simulator."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pacer.latency.model import ErrorWindow
from pacer.request import SLO, Request
from pacer.scheduling.admission import SLOUnattainable
from pacer.scheduling.router import ROUTERS, PrefixIndex, dispatch, router_class
from pacer.sim.simulator import SimRequest
from tests.sim.test_simulator import constant, simulator


@dataclass
class View:
    num_outstanding_tokens: int
    ttft_s: float | None = None
    sent: PrefixIndex = field(default_factory=PrefixIndex)

    def cached_prompt_tokens(self, request: Request) -> int:
        return self.sent.cached_prompt_tokens(request)

    def predicted_ttft_s(self, request: Request) -> float | None:
        return self.ttft_s


REQUEST = Request("r", [0] * 8)


def test_registry_lists_the_policies_and_names_them_on_error():
    assert {"round_robin", "least_tokens", "slo"} <= set(ROUTERS)
    with pytest.raises(ValueError, match="known: least_tokens, round_robin, slo"):
        router_class("random")


def test_round_robin_cycles_blind_to_load():
    router = router_class("round_robin")()
    views = [View(1000), View(0), View(5)]
    assert [router.choose(REQUEST, views) for _ in range(5)] == [0, 1, 2, 0, 1]


def test_least_tokens_takes_the_lightest_replica_first_on_ties():
    router = router_class("least_tokens")()
    assert router.choose(REQUEST, [View(30), View(10), View(10)]) == 1


def test_slo_router_prefers_the_shorter_predicted_ttft_over_fewer_tokens():
    router = router_class("slo")()
    assert router.choose(REQUEST, [View(10, 2.0), View(500, 0.5)]) == 1  # no TTFT SLO: the soonest first token
    due = Request("d", [0] * 8, slo=SLO(ttft_s=1.0))
    assert router.choose(due, [View(10, 2.0), View(500, 0.5)]) == 1  # only that one keeps the promise
    assert router.choose(due, [View(10, 3.0), View(500, 2.0)]) == 1  # none can: the least late
    assert router.choose(REQUEST, [View(10), View(5)]) == 1  # no predictions: fewest tokens decides


def test_slo_router_keeps_the_promise_with_the_most_room_left():
    """Among replicas that all meet the TTFT SLO, the one with the fewest outstanding tokens, not the soonest:
    the soonest replica stays free for a request that needs it."""
    router = router_class("slo")()
    due = Request("d", [0] * 8, slo=SLO(ttft_s=1.0))
    assert router.choose(due, [View(500, 0.1), View(10, 0.9), View(600, 1.5)]) == 1
    assert router.choose(due, [View(10, 0.9), View(10, 0.4)]) == 1  # equal room: the sooner


def test_replicas_report_outstanding_tokens_and_predicted_ttft():
    sim = simulator(constant(0.1), policy="slo", replicas=2)
    sim.router = router_class("least_tokens")()
    sim.run([SimRequest(0, 0.0, 100, 10), SimRequest(1, 0.0, 8, 2), SimRequest(2, 0.05, 8, 2)])
    # request 2 went to the replica with 10 outstanding tokens (request 1's), not the one with 110
    assert sim.replicas[1].num_iterations == 3
    idle = sim.replicas[0]
    assert idle.num_outstanding_tokens == 0
    # one chunk, over 1 + the margin of a model that has seen nothing yet (the soonest it allows)
    assert idle.predicted_ttft_s(Request("x", [0] * 8)) == pytest.approx(0.1 / (1 + ErrorWindow.initial_margin))


def test_dispatch_refuses_only_when_no_replica_can_meet_the_ttft_slo():
    router = router_class("round_robin")()
    due = Request("r", [0] * 8, slo=SLO(ttft_s=1.0), arrival_s=10.0)
    assert dispatch([due], [View(0, 5.0), View(0, 0.5)], router, now=10.0) == 1  # round robin chose 0: too slow
    assert dispatch([due], [View(0, 0.2), View(0, 0.5)], router, now=10.0) == 1  # its choice meets the SLO
    with pytest.raises(SLOUnattainable) as refused:
        dispatch([due], [View(0, 3.1), View(0, 2.5)], router, now=10.2)  # waited 0.2 s: 2.7 s at best
    assert refused.value.retry_after_s == 2  # the predicted excess of the best replica, rounded up
    fresh = router_class("round_robin")()
    assert dispatch([due], [View(0, 3.1), View(0, 2.5)], fresh, now=10.2, admit=False) == 0  # served all the same
    assert dispatch([due], [View(0), View(0)], router, now=10.0) == 1  # no predictions: no refusal
    assert dispatch([Request("s", [0] * 8)], [View(0, 99.0), View(0, 99.0)], router, now=0.0) == 0  # no SLO


def test_slo_router_sends_a_shared_prefix_back_where_it_went_while_that_keeps_the_promise():
    router = router_class("slo")()
    system = list(range(100, 164))  # four 16-token blocks
    views = [View(10, 0.5), View(400, 0.5)]
    first = Request("a", system + [1] * 8, slo=SLO(ttft_s=1.0))
    assert dispatch([first], views, router, now=0.0) == 0  # most room
    views[0].sent.add(PrefixIndex.prompt_keys(first))  # as the front end records what it sends
    views[0].num_outstanding_tokens = 800  # now the busier one
    follow_up = Request("b", system + [2] * 8, slo=SLO(ttft_s=1.0))
    assert router.choose(follow_up, views) == 0  # it holds the system prompt
    assert router.choose(Request("c", list(range(300, 380)), slo=SLO(ttft_s=1.0)), views) == 1  # shares nothing
    views[0].ttft_s = 2.0
    assert router.choose(follow_up, views) == 1  # the promise first


def test_the_prefix_index_forgets_the_least_recently_sent_past_its_capacity():
    index = PrefixIndex(capacity=4)
    first, second = PrefixIndex.keys_of(list(range(64))), PrefixIndex.keys_of(list(range(500, 548)))
    index.add(first)
    assert index.num_cached_tokens(first) == 64 and index.num_cached_tokens(first[:2]) == 32
    index.add(second)  # 3 more blocks: the first prompt's oldest 3 go
    assert index.num_cached_tokens(second) == 48 and index.num_cached_tokens(first) == 0


def test_a_simulated_replica_believes_it_holds_the_prompts_it_was_sent():
    """As a real front end, the simulator's replica views believe what was sent to them (in 16-token blocks);
    replicas without a prefix cache are believed to hold nothing."""
    system = tuple(range(100, 148))  # three blocks
    follow_up = Request("f", [*system, 7, 7])
    for prefix_caching, held in ((True, [48, 0]), (False, [0, 0])):
        sim = simulator(constant(0.1), policy="slo", replicas=2, prefix_caching=prefix_caching)
        sim.router = router_class("round_robin")()
        sim.run([SimRequest(0, 0.0, 56, 2, prefix=system), SimRequest(1, 0.0, 8, 2)])
        assert [replica.cached_prompt_tokens(follow_up) for replica in sim.replicas] == held
