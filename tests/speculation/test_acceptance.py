"""The per-request acceptance rate: a Bernoulli chain's estimate, fading with the tokens generated since."""

from __future__ import annotations

import pytest

from pacer.speculation.acceptance import PRIOR_RATE, AcceptanceRate


def test_before_any_row_the_rate_is_the_prior():
    assert AcceptanceRate().rate(100) == PRIOR_RATE == 0.5


def test_drafts_after_the_first_rejected_one_count_for_nothing():
    rate = AcceptanceRate()
    rate.observe(num_drafts=4, num_accepted=1, num_tokens=0)  # one success, one failure, two never judged
    assert rate.rate(0) == pytest.approx((1 + 0.5) / (1 + 1 + 1))


def test_rows_all_accepted_raise_it_and_rows_all_rejected_lower_it():
    high, low = AcceptanceRate(), AcceptanceRate()
    for i in range(20):
        high.observe(4, 4, num_tokens=5 * i)
        low.observe(4, 0, num_tokens=i)
    assert high.rate(100) > 0.9 and low.rate(20) < 0.1


def test_old_evidence_fades_back_to_the_prior():
    rate = AcceptanceRate()
    for i in range(30):
        rate.observe(2, 0, num_tokens=i)
    learnt = rate.rate(30)
    assert learnt < rate.rate(100) < rate.rate(300) < PRIOR_RATE
    assert rate.rate(1000) == pytest.approx(PRIOR_RATE, abs=1e-3) and learnt < 0.05
