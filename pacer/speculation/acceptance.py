"""How likely is a request's next draft to be accepted? A running estimate per request, from its verify rows."""

from __future__ import annotations

from dataclasses import dataclass

# Evidence fades by this factor per token the request generates (a memory of ~50 tokens): the text a request
# writes changes (a quoted passage, then free prose), and a request whose drafts stopped being verified drifts
# back to the prior, so it is probed again now and then rather than never.
DECAY_PER_TOKEN = 0.98
# Beta(1, 1) prior: mean 1/2, worth two drafts of evidence, so a request's first verify rows are short and its own
# record takes over within a few iterations.
PRIOR_ACCEPTED, PRIOR_REJECTED = 1.0, 1.0


@dataclass
class AcceptanceRate:
    """A discounted Beta estimate of the chance that a draft is accepted, given the drafts before it were.

    A verify row is a Bernoulli chain: each accepted draft is a success, the first rejected one a failure, and the
    drafts after it were never judged (they count for nothing). accepted / proposed would count them as failures
    and underrate long rows."""

    num_accepted: float = 0.0  # decayed successes
    num_rejected: float = 0.0  # decayed failures
    at_token: int = 0  # the request's token count when last observed: the decay is applied lazily

    def rate(self, num_tokens: int) -> float:
        """The estimate for a request that now has `num_tokens` tokens."""
        fade = DECAY_PER_TOKEN ** max(0, num_tokens - self.at_token)
        accepted, rejected = fade * self.num_accepted, fade * self.num_rejected
        return (accepted + PRIOR_ACCEPTED) / (accepted + rejected + PRIOR_ACCEPTED + PRIOR_REJECTED)

    def observe(self, num_drafts: int, num_accepted: int, num_tokens: int) -> None:
        """Fold in a verify row of `num_drafts` drafts, `num_accepted` of them accepted (a prefix), checked when the
        request had `num_tokens` tokens."""
        fade = DECAY_PER_TOKEN ** max(0, num_tokens - self.at_token)
        self.num_accepted = fade * self.num_accepted + num_accepted
        self.num_rejected = fade * self.num_rejected + (num_accepted < num_drafts)
        self.at_token = num_tokens


PRIOR_RATE = AcceptanceRate().rate(0)
