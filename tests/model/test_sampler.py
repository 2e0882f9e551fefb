"""Sampling filters: greedy, top-k, top-p, min-p, seeds."""

from __future__ import annotations

import torch

from pacer.model.sampler import sample
from pacer.request import SamplingParams


def draw(logits, params, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [sample(logits[None], [params], [g])[0][0] for _ in range(n)]


LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def test_greedy_and_top_k_1_pick_the_argmax():
    assert sample(LOGITS[None], [SamplingParams(temperature=0)], [None])[0] == [0]
    assert set(draw(LOGITS, SamplingParams(temperature=1.0, top_k=1), n=50)) == {0}


def test_top_k_top_p_min_p_restrict_the_support():
    assert set(draw(LOGITS, SamplingParams(top_k=2))) == {0, 1}
    assert set(draw(LOGITS, SamplingParams(top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draw(LOGITS, SamplingParams(top_p=0.5))) == {0}
    assert set(draw(LOGITS, SamplingParams(min_p=0.25))) == {0, 1, 2}  # 0.15 >= 0.125 > 0.05


def test_unfiltered_sampling_follows_the_distribution():
    counts = torch.bincount(torch.tensor(draw(LOGITS, SamplingParams(), n=4000)), minlength=4) / 4000
    assert torch.allclose(counts, LOGITS.exp(), atol=0.03)


def test_same_seed_same_tokens():
    assert draw(LOGITS, SamplingParams(), n=20, seed=5) == draw(LOGITS, SamplingParams(), n=20, seed=5)


def test_nucleus_wider_than_the_candidate_set_falls_back_to_a_full_sort():
    flat = torch.zeros(5000)  # uniform: top_p 0.9 keeps 4500 tokens, more than the 1024 candidates
    tokens = draw(flat, SamplingParams(top_p=0.9), n=300)
    assert max(tokens) > 1024


def penalized(params: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    from pacer.model.sampler import apply_penalties
    from pacer.request import Request

    request = Request("r", prompt, params)
    request.token_ids += output
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    apply_penalties(logits, [request])
    return logits[0]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = penalized(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[3], output=[0, 0, 1])
    assert torch.allclose(logits, torch.tensor([2.0 - 0.5 - 0.5, -2.0 - 0.5 - 0.25, 1.0, 0.5]))


def test_repetition_penalty_pushes_seen_tokens_down_whatever_their_sign():
    logits = penalized(SamplingParams(repetition_penalty=2.0), prompt=[1], output=[0])
    assert torch.allclose(logits, torch.tensor([1.0, -4.0, 1.0, 0.5]))


def test_penalty_ranges_are_validated():
    import pytest

    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"repetition_penalty": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_seeds_a_torch_generator_cannot_take_are_refused():
    import pytest

    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed)
    for seed in (2**64 - 1, -(2**63)):
        torch.Generator().manual_seed(SamplingParams(seed=seed).seed)


def test_a_top_k_beyond_the_vocabulary_samples_as_no_top_k():
    """The same draws as top_k 0, so it took the unfiltered path, not a topk over the whole vocabulary (a fuzzed
    top_k of 2**63 with n=40 took 6 s on the tiny model)."""
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    for top_p in (1.0, 0.9):
        huge = draw(logits, SamplingParams(top_k=2**63, top_p=top_p), n=50)
        assert huge == draw(logits, SamplingParams(top_k=0, top_p=top_p), n=50)
        assert huge == draw(logits, SamplingParams(top_k=5000, top_p=top_p), n=50)


def test_a_temperature_too_small_to_divide_by_is_greedy():
    params = SamplingParams(temperature=1e-300)
    assert params.greedy and sample(LOGITS[None], [params], [None])[0] == [0]


def test_rows_without_penalties_are_left_alone_in_a_mixed_batch():
    from pacer.model.sampler import apply_penalties
    from pacer.request import Request

    plain, penalized = Request("a", [0, 1]), Request("b", [0, 1], SamplingParams(repetition_penalty=2.0))
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    apply_penalties(logits, [plain, penalized])
    assert torch.equal(logits, torch.tensor([[2.0, -2.0, 1.0], [1.0, -4.0, 1.0]]))
