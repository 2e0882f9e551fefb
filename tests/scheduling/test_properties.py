"""Property-based tests of scheduler + KV manager: random arrivals, lengths, aborts, tiny KV pools."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pacer.latency.model import LinearLatencyModel
from pacer.request import SLO
from tests.scheduling.helpers import EOS, make_request, make_scheduler, step

workload = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 6), st.booleans()),
    min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(policy=st.sampled_from(["fcfs", "orca", "sarathi", "slo"]), requests=workload,
       num_blocks=st.integers(14, 40), block_size=st.sampled_from([1, 3, 4, 16]),
       budget=st.integers(52, 80), max_num_seqs=st.integers(1, 6), prefix_caching=st.booleans(),
       drafts=st.lists(st.sampled_from([7, 9, EOS]), max_size=4))
def test_every_request_ends_and_no_block_leaks(policy, requests, num_blocks, block_size, budget, max_num_seqs,
                                               prefix_caching, drafts):
    """With prefix caching the prompts share their heads (make_request counts up from 10), so requests start on
    each other's blocks, while running, finished or preempted. With drafts, every decode proposes them and the
    fake model accepts a varying prefix of them (an EOS among those ends the request there)."""
    latency = LinearLatencyModel([0.01, 0.001, 0.0, 0.0, 0.0, 0.0], ()) if policy == "slo" else None
    s = make_scheduler(policy, num_blocks=max(num_blocks, -(-56 // block_size)), block_size=block_size,
                       budget=budget, max_num_seqs=max_num_seqs, latency=latency, prefix_caching=prefix_caching)
    pending = sorted(((arrival, i, p, m, abort) for i, (p, m, arrival, abort) in enumerate(requests)))
    ids = [f"r{i}" for _, i, *_ in pending]
    ended: set[str] = set()
    for t in range(2000):
        while pending and pending[0][0] <= t:
            _, i, prompt, max_tokens, abort = pending.pop(0)
            request = make_request(f"r{i}", prompt, max_tokens=max_tokens, arrival_s=t)
            # mixed promises and priorities (only the slo policy reads them)
            request.slo = SLO(ttft_s=2.0 + i % 4, tbt_s=0.03 if i % 3 else None, priority=i % 3)
            s.add(request)
            if abort and i % 2:
                s.finish(f"r{i}")
                ended.add(f"r{i}")
        _plan, finished = step(s, now=float(t), drafts=drafts,
                               accept=lambda r, d: (r.num_tokens * 7 + len(r.request_id)) % (len(d) + 1))
        for r in finished:
            assert r.request_id not in ended, "a request finished twice"
            ended.add(r.request_id)
        if not pending and not s.has_unfinished:
            break
    assert not s.has_unfinished, f"starved: {[r.request_id for r in s.waiting]} waiting"
    assert ended == set(ids)
    assert s.kv.num_free_blocks == s.kv.num_blocks
