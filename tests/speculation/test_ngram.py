"""N-gram drafts: what they propose, and that they stay cheap enough to run for every decode of every iteration."""

from __future__ import annotations

import random
import time

from pacer.request import Request, SamplingParams
from pacer.speculation.drafter import NgramDrafter, can_speculate
from pacer.speculation.ngram import TokenBuffer, propose_ngram


def proposal(ids: list[int], k: int = 4, min_n: int = 2, max_n: int = 4) -> list[int]:
    buffer = TokenBuffer()
    buffer.sync(ids)
    return propose_ngram(buffer, k, min_n, max_n)


def test_continues_the_latest_earlier_occurrence_of_the_suffix():
    ids = [1, 2, 3, 4, 5, 6, 9, 2, 3, 7, 8, 0, 0, 2, 3]
    assert proposal(ids) == [7, 8, 0, 0]  # "2 3" occurs twice before: the later one is followed by 7 8 0 0
    assert proposal(ids, k=2) == [7, 8]


def test_the_longest_matching_n_gram_wins():
    # "3" alone last occurred before 9, but "1 2 3" occurred before 4 5
    ids = [1, 2, 3, 4, 5, 6, 3, 9, 9, 1, 2, 3]
    assert proposal(ids, min_n=1, max_n=3) == [4, 5, 6, 3]
    assert proposal(ids, min_n=1, max_n=1) == [9, 9, 1, 2]


def test_no_match_no_drafts():
    assert proposal([1, 2, 3, 4, 5]) == []
    assert proposal([1, 2]) == []
    assert proposal([]) == []
    assert proposal([1, 2, 1, 2], k=0) == []


def test_a_loop_shorter_than_k_repeats():
    assert proposal([5, 1, 2, 3, 1, 2, 3], k=7) == [1, 2, 3, 1, 2, 3, 1]
    assert proposal([4, 4, 4], k=3, min_n=1) == [4, 4, 4]


def test_matches_start_on_token_boundaries():
    # As bytes, 256 = 00 01 00 00 and 1 = 01 00 00 00: the suffix [1, 0] as bytes also occurs straddling
    # [256, 256, ...]; only a match aligned to whole tokens counts.
    ids = [7, 256, 256, 9, 1, 0, 5, 3, 1, 0]
    assert proposal(ids, max_n=2) == [5, 3, 1, 0]


def test_the_buffer_grows_with_the_tokens():
    rng = random.Random(1)
    ids = [rng.randrange(50) for _ in range(300)]
    buffer = TokenBuffer()
    for end in range(1, len(ids) + 1, 7):
        buffer.sync(ids[:end])
        fresh = TokenBuffer()
        fresh.sync(ids[:end])
        assert buffer.data == fresh.data and propose_ngram(buffer, 3) == propose_ngram(fresh, 3)


def test_only_plain_sampling_is_drafted():
    def request(**sampling) -> Request:
        r = Request("a", [1, 2, 3, 1, 2], SamplingParams(**sampling))
        r.token_ids.append(3)
        r.num_computed_tokens = 5
        return r

    assert can_speculate(request(temperature=0.7, top_p=0.9))
    assert not can_speculate(request(presence_penalty=0.5))
    assert not can_speculate(request(logprobs=0))
    assert not can_speculate(request(min_tokens=2))
    assert can_speculate(request(min_tokens=1))  # the masked tokens are behind it
    drafter = NgramDrafter(3)
    plain, penalized = request(), request(repetition_penalty=1.2)
    drafter.propose([plain, penalized])
    assert plain.spec_token_ids == [1, 2, 3] and penalized.spec_token_ids == []


def test_fast_at_two_thousand_tokens():
    """Each iteration syncs one new token and searches: well under 50 us a request at 2k tokens."""
    rng = random.Random(0)
    ids = [rng.randrange(50_000) for _ in range(2048)]  # no repeats: every n-gram size is searched in full
    drafter = NgramDrafter(4, min_n=1)
    r = Request("a", ids)
    r.num_computed_tokens = len(ids) - 1  # decoding
    drafter.propose([r])
    n = 300
    start = time.perf_counter()
    for i in range(n):
        r.token_ids.append(50_000 + i)
        r.num_computed_tokens += 1
        drafter.propose([r])
    per_request = (time.perf_counter() - start) / n
    assert per_request < 50e-6, f"{per_request * 1e6:.0f} us a request"
    r.token_ids += ids[100:102]  # a repeat, which it finds
    r.num_computed_tokens += 2
    drafter.propose([r])
    assert r.spec_token_ids == ids[102:106]


def test_a_request_id_used_again_starts_a_new_buffer():
    def decoding(tokens: list[int]) -> Request:
        r = Request("a", tokens)
        r.num_computed_tokens = len(tokens) - 1
        return r

    drafter = NgramDrafter(2)
    drafter.propose([old := decoding([1, 2, 3, 1, 2])])
    assert old.spec_token_ids == [3, 1]
    drafter.propose([new := decoding([5, 6, 7, 8, 5, 6, 9, 5, 6])])  # the same id, other tokens, more of them
    assert new.spec_token_ids == [9, 5]
