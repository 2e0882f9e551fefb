"""The goodput-sized draft length (SmartSpec) against fake linear latency models: no scheduler needed."""

from __future__ import annotations

import pytest

from pacer.latency.model import BatchShape, LinearLatencyModel
from pacer.speculation.length import DraftRow, draft_lengths, expected_tokens


def memory_bound() -> LinearLatencyModel:
    """10 ms of weight reads + 0.1 ms a token, and 0.3 ms more a token past 32 (the GEMMs turn compute-bound)."""
    return LinearLatencyModel([0.010, 0.0001, 0.0003, 0.0, 0.0, 0.0, 0.0], (32,))


def decodes(n: int, context: int = 100) -> BatchShape:
    shape = BatchShape()
    for _ in range(n):
        shape = shape.with_decode(context + 1)
    return shape


def lengths(n: int, rate: float, limit: int = 4, budget: int = 1000, limit_s: float = float("inf")) -> list[int]:
    rows = [DraftRow(100, limit, rate)] * n
    return draft_lengths(rows, decodes(n), n, budget, memory_bound().predict, limit_s)


def test_expected_tokens_is_the_accepted_prefix_and_the_token_after_it():
    assert expected_tokens(0.5, 0) == 1 and expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 3) == 4 and expected_tokens(0.0, 3) == 1


def test_a_row_is_taken_out_of_a_shape_and_put_back_exactly():
    shape = decodes(3).with_chunk(5, 40)
    assert shape.without_chunk(5, 40).with_chunk(3, 40).without_chunk(3, 40) == decodes(3)
    assert decodes(3).without_chunk(1, 100) == decodes(2)


def test_at_small_batch_a_high_rate_takes_every_draft():
    assert lengths(1, 0.9) == [4] and lengths(4, 0.8) == [4, 4, 4, 4]


def test_a_low_rate_takes_none():
    assert lengths(1, 0.005) == [0] and lengths(4, 0.0) == [0] * 4


def test_a_middling_rate_stops_where_the_next_draft_adds_less_than_it_costs():
    # a = 0.1 at batch 1: the first draft adds 0.1 tokens for 1 % more time, the second 0.01 for 1 %
    assert lengths(1, 0.1) == [1]


def test_a_large_batch_turns_it_off():
    assert lengths(2, 0.8) == [4, 4]
    assert sum(lengths(64, 0.8)) == 0


def test_the_better_rate_gets_the_drafts_first():
    rows = [DraftRow(100, 4, 0.3), DraftRow(100, 4, 0.9)]
    assert draft_lengths(rows, decodes(2), 2, 3, memory_bound().predict) == [0, 3]


def test_the_budget_and_the_time_limit_bound_the_drafts():
    assert sum(lengths(4, 0.9, budget=6)) == 6
    limit_s = memory_bound().predict(decodes(1).without_chunk(1, 100).with_chunk(3, 100))
    assert lengths(1, 0.9, limit_s=limit_s) == [2]


def test_without_a_latency_model_drafts_fill_the_budget_for_rows_whose_rate_is_not_low():
    rows = [DraftRow(100, 4, 0.5), DraftRow(100, 4, 0.05), DraftRow(100, 4, 0.5)]
    assert draft_lengths(rows, decodes(3), 3, 6) == [3, 0, 3]
