"""Verifying a verify row's drafts against the target model's logits at each of its positions, so that what is
generated is distributed exactly as without speculation."""

from __future__ import annotations

import torch

from pacer.model.sampler import filtered_probs, race
from pacer.request import SamplingParams


def accept_greedy(targets: list[int], drafts: list[int]) -> tuple[list[int], int]:
    """Greedy verification, from the argmax at each of the row's k + 1 positions (taken for the whole batch at
    once): drafts are accepted while each is the argmax at its position, the tokens greedy decoding would produce,
    and the token after them is the argmax at the first mismatch, or the bonus token when all k are accepted."""
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return drafts[:n], targets[n]


def verify_sampled(logits: torch.Tensor, drafts: list[int], params: SamplingParams,
                   generator: torch.Generator | None) -> tuple[list[int], int]:
    """logits: [k + 1, V] fp32, row i after the row's last token and drafts[:i]. Returns the accepted drafts (a
    prefix) and the token after them.

    Speculative sampling (Leviathan et al., ICML'23, §2.3) for a deterministic draft, whose distribution q is a
    point mass on x: x must be accepted with probability min(1, p(x) / q(x)) = p(x), p being the filtered target
    distribution (temperature, top-k, top-p, min-p) at its position, and at the first rejection the token must come
    from the residual max(0, p - q) normalised, which is p without x. Drawing t ~ p with the sampler's own noise and
    accepting x iff t == x does both: P(accept) = p(x), and a rejected t is p conditioned on t != x. So each
    position draws exactly what decoding it alone would, from the same generator in the same order: seeded output
    is the same with drafts as without (up to the logits' rounding in a longer row)."""
    for i, draft in enumerate(drafts):
        token = race(*filtered_probs(logits[i], params), generator)
        if token != draft:
            return drafts[:i], token
    return drafts, race(*filtered_probs(logits[len(drafts)], params), generator)
