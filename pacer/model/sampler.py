"""Token sampling for a batch of rows with per-row parameters: penalties, greedy, temperature, top-k/p, min-p."""

from __future__ import annotations

import torch

from pacer.request import Request, SamplingParams
from pacer.scheduling import TokenLogprobs

# Nucleus candidates are taken from the top NUCLEUS_CANDIDATES tokens (a top-k is far cheaper
# than sorting a 49k vocabulary per row); a row whose nucleus is wider falls back to a full sort.
NUCLEUS_CANDIDATES = 1024


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    """Penalize repeats in place, row by row (row i is requests[i]; rows without penalties are untouched),
    with vLLM's semantics.

    Presence and frequency penalties (OpenAI) count the output tokens only; the repetition penalty
    (CTRL, arXiv 1909.05858) covers prompt and output and pushes a logit towards less likely
    whatever its sign.
    """
    vocab_size = logits.shape[-1]
    for row, request in enumerate(requests):
        p = request.sampling
        if p.repetition_penalty != 1:
            seen = torch.tensor(request.token_ids, device=logits.device).unique()
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty,
                                            values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and request.num_output_tokens:
            counts = torch.bincount(torch.tensor(request.output_token_ids, device=logits.device),
                                    minlength=vocab_size).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [S, V] fp32, one row per sampling request. Returns token ids and logprobs per row."""
    greedy = [p.greedy for p in params]
    tokens = logits.argmax(dim=-1)
    if not all(greedy):
        for row, p in enumerate(params):
            if not greedy[row]:
                tokens[row] = _sample_row(logits[row], p, generators[row])
    token_list = tokens.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * len(params)
    wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        # Logprobs of the model's own distribution (before temperature and filters), as vLLM reports.
        rows = torch.log_softmax(logits[wanted], dim=-1)
        for i, row in enumerate(wanted):
            k = params[row].logprobs or 0
            top = rows[i].topk(k) if k else None
            logprobs[row] = TokenLogprobs(
                logprob=rows[i, token_list[row]].item(),
                top=list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [])
    return token_list, logprobs


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """Sample one token from `logits` [V] after temperature and the top-k, top-p, min-p filters."""
    values, indices = filtered_probs(logits, p)
    return race(values, indices, generator)


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distribution tokens are sampled from: softmax(logits / temperature) with the top-k, top-p and min-p
    filters applied, unnormalised (filtered tokens have 0). Returns (values, indices): the probability of token
    indices[i] is values[i] / values.sum(), or, where indices is None, values covers the whole vocabulary."""
    probs = torch.softmax(logits / p.temperature, dim=-1)
    top_k = max(0, p.top_k)
    if top_k >= probs.numel():
        top_k = 0  # keeps every token anyway: no full-vocabulary topk (10 ms a row and token on a CPU)
    if not (top_k or p.top_p < 1 or p.min_p > 0):
        return probs, None
    k = min(probs.numel(), top_k or NUCLEUS_CANDIDATES)
    values, indices = probs.topk(k)
    if not top_k and p.top_p < 1 and values.sum() < p.top_p and k < probs.numel():
        values, indices = probs.sort(descending=True)
    keep = torch.ones_like(values, dtype=torch.bool)
    if p.top_p < 1:
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
        keep &= (values.cumsum(0) - values) < p.top_p
    if p.min_p > 0:
        keep &= values >= p.min_p * values[0]
    keep[0] = True
    return values * keep, indices


def race(values: torch.Tensor, indices: torch.Tensor | None, generator: torch.Generator | None) -> int:
    """A token drawn from `filtered_probs`' (values, indices). Exponential race (Gumbel-max for probabilities):
    argmax p_i / E_i with E_i ~ Exp(1) is a sample from p, and needs no normalisation after filtering."""
    noise = torch.empty_like(values).exponential_(generator=generator)
    choice = int((values / noise).argmax())
    return choice if indices is None else int(indices[choice])
