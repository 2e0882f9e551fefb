"""SimExecutor: an Executor that runs no model; an iteration takes the time the latency model predicts for it."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pacer.latency.model import LatencyModel
from pacer.request import Request
from pacer.scheduling import ModelOutput, SchedulerOutput
from pacer.speculation.drafter import can_speculate

# Per-request acceptance rates are drawn from a Beta with the run's mean and this concentration (a + b): requests
# differ (a spread of ~0.1 around 0.7), as the text they write does, so the scheduler's per-request estimate matters.
RATE_CONCENTRATION = 20.0


class SimExecutor:
    """Fits the same seam as the model runner (`engine.executor.Executor`).

    Every request that reaches its last token samples `token_id`; simulated requests ignore EOS, so the value
    only has to be a valid id. With `noise` > 0, each time is multiplied by a seeded log-normal factor with
    mean 1 and that coefficient of variation, as a real machine jitters (the model predicts the mean).

    With `acceptance_rate`, verify rows accept a seeded Bernoulli chain of their drafts: each request draws its own
    rate around that mean when first verified, and each draft is accepted with it while the ones before it were.
    """

    def __init__(self, latency: LatencyModel, token_id: int = 0, noise: float = 0.0, seed: int = 0,
                 residuals: dict[str, list[float]] | None = None, acceptance_rate: float = 0.0) -> None:
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if not 0 <= acceptance_rate <= 1:
            raise ValueError(f"acceptance_rate must be in [0, 1], got {acceptance_rate}")
        self.acceptance_rate = acceptance_rate
        self._rates: dict[str, float] = {}  # request id -> its own acceptance rate, while it runs
        self._draft_rng = random.Random(seed + 1)  # drafts' own stream: timings stay those of the same seed
        self.latency = latency
        self.token_id = token_id
        self._sigma = math.sqrt(math.log1p(noise**2))  # log-normal with CV = noise
        self._rng = random.Random(seed)
        # measured / predicted ratios of real iterations, per regime ("prefill": carries a chunk; "decode"):
        # each simulated iteration is scaled by the next one in recorded order (from a seeded offset, wrapping),
        # so the machine's own error (bias, spread, stalls, and slow spells that last) replays instead of an
        # assumed distribution. Drawn at random, a slow spell became uncorrelated noise, which the latency
        # model's fast factor cannot track as it does on the real machine.
        self.residuals = residuals
        self._cursor = {regime: self._rng.randrange(len(r)) for regime, r in residuals.items()} if residuals else {}

    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        sampled = {r.request_id: self.token_id for r in plan.requests if plan.samples(r)}
        shape = plan.shape
        elapsed = self.latency.predict(shape)
        if self.residuals:
            regime = "prefill" if shape.num_prefill_tokens else "decode"
            ratios, i = self.residuals[regime], self._cursor[regime]
            elapsed *= ratios[i]
            self._cursor[regime] = (i + 1) % len(ratios)
        if self._sigma:
            elapsed *= self._rng.lognormvariate(-self._sigma**2 / 2, self._sigma)
        for request_id in plan.finished_ids:
            self._rates.pop(request_id, None)
        accepted = {rid: drafts[:self._num_accepted(rid, len(drafts))] for rid, drafts in plan.draft_token_ids.items()}
        return ModelOutput(sampled, elapsed_s=elapsed, accepted_draft_ids=accepted)

    def _num_accepted(self, request_id: str, num_drafts: int) -> int:
        rate = self._rates.get(request_id)
        if rate is None:
            mean = self.acceptance_rate
            rate = mean if mean in (0, 1) else self._draft_rng.betavariate(
                mean * RATE_CONCENTRATION, (1 - mean) * RATE_CONCENTRATION)
            self._rates[request_id] = rate
        n = 0
        while n < num_drafts and self._draft_rng.random() < rate:
            n += 1
        return n

    def export_kv(self, block_ids: list[int], num_tokens: int) -> SimKV:
        """Disaggregated serving's hand-over (the model runner's, in kind): no tensors here, so the payload says
        which tokens' KV moves; the simulator times the transfer from it."""
        return SimKV(num_tokens)

    def import_kv(self, block_ids: list[int], payload: SimKV) -> None:
        """Nothing to copy: the blocks the scheduler allocated stand for the KV that arrived."""


class SimDrafter:
    """The simulator's drafter: simulated tokens are no text, so there is nothing for n-grams to find; every running
    decode that may speculate proposes `num_speculative_tokens` drafts (the executor decides which are accepted)."""

    def __init__(self, num_speculative_tokens: int, token_id: int = 0) -> None:
        self.drafts = [token_id] * num_speculative_tokens

    def propose(self, running: Iterable[Request]) -> None:
        for request in running:
            request.spec_token_ids = [] if request.is_prefilling or not can_speculate(request) else self.drafts


@dataclass(frozen=True)
class SimKV:
    """The simulator's hand-over payload: the KV of a prompt's `num_tokens` tokens from block `first_block` on
    (the model runner's `KVPayload` without the tensors)."""

    num_tokens: int
    first_block: int = 0

    def skip(self, num_blocks: int) -> SimKV:
        return dataclasses.replace(self, first_block=self.first_block + num_blocks)


def load_residuals(path: str | Path) -> dict[str, list[float]]:
    """Ratios measured / predicted per regime from a record of real iterations: a JSON with "iterations", each
    holding `raw_predicted_s` (the profile alone), `elapsed_s` and its `shape` (benchmarks/latency_error.py)."""
    try:
        iterations = json.loads(Path(path).read_text())["iterations"]
        ratios: dict[str, list[float]] = {"prefill": [], "decode": []}
        for it in iterations:
            regime = "prefill" if it["shape"]["num_prefill_tokens"] else "decode"
            ratios[regime].append(it["elapsed_s"] / it["raw_predicted_s"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as error:
        raise ValueError(f"cannot read measured iterations from {path}: {error!r}") from None
    if not ratios["prefill"] or not ratios["decode"]:
        raise ValueError(f"{path} needs measured iterations with and without a prefill chunk")
    return ratios
