"""Verification of drafts: greedy keeps greedy's tokens; rejection sampling keeps the target distribution."""

from __future__ import annotations

import pytest
import torch

from pacer.model.sampler import filtered_probs
from pacer.model.verify import accept_greedy, verify_sampled
from pacer.request import SamplingParams


def test_greedy_accepts_while_drafts_are_the_argmax_then_takes_the_targets_token():
    targets = [3, 1, 4, 5]  # the argmax at each position
    assert accept_greedy(targets, [3, 1, 4]) == ([3, 1, 4], 5)  # all accepted: the bonus token
    assert accept_greedy(targets, [3, 2, 4]) == ([3], 1)  # the first mismatch takes the target's token
    assert accept_greedy(targets, [0, 1, 4]) == ([], 3)
    assert accept_greedy(targets[:1], []) == ([], 3)


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),
]


def target(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    values, indices = filtered_probs(logits, params)
    probs = values / values.sum()
    return probs if indices is None else torch.zeros_like(logits).scatter(0, indices, probs)


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("draft", [0, 2, 4])  # likely, unlikely, filtered out (for the filtering params)
def test_rejection_sampling_keeps_the_target_distribution(params, draft):
    """First output token ~ p0 whatever the draft; after an accepted draft, the next ~ p1 (a chi-square test each,
    seeded); the acceptance rate is p0(draft)."""
    logits = torch.tensor([[2.0, 0.5, 1.5, -0.5, -3.0], [0.0, 1.0, -1.0, 2.0, 0.5]])
    generator = torch.Generator().manual_seed(1234)
    trials = 4000
    first = torch.zeros(5)
    second = torch.zeros(5)
    accepted = 0
    for _ in range(trials):
        drafts, token = verify_sampled(logits, [draft], params, generator)
        first[drafts[0] if drafts else token] += 1
        if drafts:
            accepted += 1
            second[token] += 1
    p0, p1 = target(logits[0], params), target(logits[1], params)
    assert abs(accepted / trials - p0[draft].item()) < 0.03
    for counts, p, n in ((first, p0, trials), (second, p1, accepted)):
        if n < 100:
            continue
        assert counts[p == 0].sum() == 0, "a filtered-out token was generated"
        support = p > 0
        expected = p[support] * n
        assert chi_square_pvalue(counts[support], expected) > 1e-3


def chi_square_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test: the statistic's upper tail under chi-square with len - 1 degrees of freedom."""
    statistic = ((observed - expected) ** 2 / expected).sum().double()
    freedom = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(freedom, statistic / 2).item() if len(observed) > 1 else 1.0


def test_seeded_verification_is_reproducible():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.9, top_p=0.95)
    runs = [[verify_sampled(logits, [1, 2, 3], params, g) for _ in range(20)]
            for g in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))]
    assert runs[0] == runs[1]
