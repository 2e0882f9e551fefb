"""How likely is a request's next draft to be accepted? A running estimate per request, from its verify rows."""

from __future__ import annotations

from dataclasses import dataclass

# Evidence fades by this factor per token the request generates (a memory of ~100 tokens): the text a request
# writes changes (a preamble, then a quoted passage), and a request whose drafts were turned off drifts back toward
# the prior until one is verified again. At an acceptance rate of 0 those probes cost about
# (1 - DECAY_PER_TOKEN) x PRIOR_ACCEPTED of the decode time (0.5 %), whatever a draft costs: a dearer draft needs a
# higher estimate to pay, which takes longer to return to.
DECAY_PER_TOKEN = 0.99
# Beta(1/2, 1/2) prior: mean 1/2, worth one draft of evidence, so a request's own record takes over at its first
# verify row, and the estimate of a request whose drafts all fail falls to ~0.5 % (under what a draft costs).
PRIOR_ACCEPTED, PRIOR_REJECTED = 0.5, 0.5


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
