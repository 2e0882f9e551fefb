"""How many drafts each decode verifies this iteration: the length that maximises predicted goodput (SmartSpec).

Goodput here is the batch's expected generated tokens over its predicted iteration time. A verify row of k drafts
with acceptance rate a yields (1 - a^(k+1)) / (1 - a) tokens in expectation (the accepted prefix and the token after
it); its (k+1)-th draft adds a^(k+1). Pure Python: the scheduler runs it every iteration that has drafts.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

from pacer.latency.model import BatchShape

# Without a latency model, a decode verifies its drafts only while its acceptance rate is at least this: the cost of
# a draft is unknown, so only a request whose drafts have clearly stopped paying (about 5 rejected rows in a row)
# is turned off, and its estimate drifting back toward the prior turns it on again now and then.
MIN_ACCEPTANCE_WITHOUT_MODEL = 0.1


@dataclass(frozen=True)
class DraftRow:
    """A decode that could verify drafts, as the length policy sees it."""

    start: int  # its computed tokens: its row is a decode of 1 token after them, or a chunk of 1 + k with drafts
    limit: int  # most drafts it may verify now (its drafts, max_tokens, the context, free KV)
    rate: float  # the chance each draft is accepted, given the ones before it were


def expected_tokens(rate: float, num_drafts: int) -> float:
    """Tokens a verify row of `num_drafts` drafts yields in expectation: 1 + a + a^2 + ... + a^k."""
    return num_drafts + 1.0 if rate >= 1 else (1 - rate ** (num_drafts + 1)) / (1 - rate)


def draft_lengths(rows: list[DraftRow], shape: BatchShape, num_sampled: int, budget: int,
                  predict: Callable[[BatchShape], float] | None = None, limit_s: float = math.inf) -> list[int]:
    """k per row, summing to at most `budget`: a greedy marginal search from k = 0 everywhere.

    `shape` is the batch as planned without drafts, `num_sampled` how many of its rows sample a token. Each step
    adds the draft with the largest expected gain (a^(k+1) of its row) and keeps it only while the predicted time
    stays within `limit_s` and goodput grows; the first that does not ends the search, since the next draft costs
    about the same whichever row gets it (a token more in the GEMMs) and every other one gains less. A draft pays
    when a / tokens > its added time / the iteration's time: at small batch the fixed cost (reading the weights)
    dominates and drafts are nearly free; in a large batch each token costs about the batch's average or more (the
    GEMMs turn compute-bound), so at high load no draft is kept and the policy turns itself off. Prompt chunks are
    placed before drafts, so under load they take the budget and drafts only ride in what they leave. Without
    `predict` (no latency model), drafts fill the budget for rows whose rate is at least
    MIN_ACCEPTANCE_WITHOUT_MODEL."""
    lengths = [0] * len(rows)
    if predict is None:
        rows = [row if row.rate >= MIN_ACCEPTANCE_WITHOUT_MODEL else DraftRow(row.start, 0, row.rate) for row in rows]
    heap = [(-row.rate, i) for i, row in enumerate(rows) if row.limit > 0 and row.rate > 0]
    heapq.heapify(heap)  # ties in batch order
    tokens = float(num_sampled)
    seconds = predict(shape) if predict is not None else 0.0
    while heap and budget > 0:
        gain, i = -heap[0][0], heap[0][1]
        row, k = rows[i], lengths[i]
        if predict is not None:
            grown = shape.without_chunk(1 + k, row.start).with_chunk(2 + k, row.start)
            grown_s = predict(grown)
            if grown_s > limit_s or (tokens + gain) * seconds <= tokens * grown_s:
                break
            shape, seconds, tokens = grown, grown_s, tokens + gain
        lengths[i] = k + 1
        budget -= 1
        if k + 1 < row.limit:
            heapq.heapreplace(heap, (-gain * row.rate, i))
        else:
            heapq.heappop(heap)
    return lengths
