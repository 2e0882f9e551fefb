"""SimExecutor: an Executor that runs no model; an iteration takes the time the latency model predicts for it."""

from __future__ import annotations

import math
import random

from pacer.latency.model import LatencyModel
from pacer.scheduling import ModelOutput, SchedulerOutput


class SimExecutor:
    """Fits the same seam as the model runner (`engine.executor.Executor`).

    Every request that reaches its last token samples `token_id`; simulated requests ignore EOS, so the value
    only has to be a valid id. With `noise` > 0, each time is multiplied by a seeded log-normal factor with
    mean 1 and that coefficient of variation, as a real machine jitters (the model predicts the mean).
    """

    def __init__(self, latency: LatencyModel, token_id: int = 0, noise: float = 0.0, seed: int = 0) -> None:
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.latency = latency
        self.token_id = token_id
        self._sigma = math.sqrt(math.log1p(noise**2))  # log-normal with CV = noise
        self._rng = random.Random(seed)

    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        scheduled = plan.num_scheduled_tokens  # a request samples when its tokens reach its end (plan.samples)
        sampled = {r.request_id: self.token_id for r in plan.requests
                   if r.num_computed_tokens + scheduled[r.request_id] == len(r.token_ids)}
        elapsed = self.latency.predict(plan.shape)
        if self._sigma:
            elapsed *= self._rng.lognormvariate(-self._sigma**2 / 2, self._sigma)
        return ModelOutput(sampled, elapsed_s=elapsed)
