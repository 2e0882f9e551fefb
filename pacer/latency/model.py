"""How long will an iteration take? A fitted function of the batch shape, corrected online (Clockwork, OSDI'20).

Pure Python + numpy, no torch: the scheduler plans with it, the simulator advances its clock with it.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np


class BatchShape(NamedTuple):
    """What decides an iteration's time, summed over its requests. Adding a request is O(1), so a
    scheduler can search chunk sizes cheaply (a NamedTuple: schedulers build one per request per iteration).

    A decode is a request given one token; a prefill chunk is n > 1 tokens after `start` cached ones.
    """

    num_prefill_tokens: int = 0
    # Σ n·(start + (n+1)/2) over chunks: query-key pairs of causal attention over the chunk + its context
    prefill_attention: float = 0.0
    prefill_context: int = 0  # Σ start over chunks: cached KV each chunk reads
    num_decodes: int = 0
    decode_context: int = 0  # Σ context length (KV read) over decodes

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decodes

    def with_chunk(self, num_tokens: int, start: int) -> BatchShape:
        if num_tokens == 1:
            return self.with_decode(start + 1)
        return BatchShape(self.num_prefill_tokens + num_tokens,
                          self.prefill_attention + num_tokens * (start + (num_tokens + 1) / 2),
                          self.prefill_context + start, self.num_decodes, self.decode_context)

    def without_chunk(self, num_tokens: int, start: int) -> BatchShape:
        """The shape without a request that `with_chunk(num_tokens, start)` added (a verify row growing by a draft
        is taken out and put back longer)."""
        if num_tokens == 1:
            return self._replace(num_decodes=self.num_decodes - 1, decode_context=self.decode_context - start - 1)
        return self._replace(num_prefill_tokens=self.num_prefill_tokens - num_tokens,
                             prefill_attention=self.prefill_attention - num_tokens * (start + (num_tokens + 1) / 2),
                             prefill_context=self.prefill_context - start)

    def with_decode(self, context: int) -> BatchShape:
        return BatchShape(self.num_prefill_tokens, self.prefill_attention, self.prefill_context,
                          self.num_decodes + 1, self.decode_context + context)


class LatencyModel(Protocol):
    """The seam the scheduler and the simulator use; `LinearLatencyModel` is the fitted one."""

    def predict(self, shape: BatchShape) -> float:
        """Seconds the iteration is expected to take."""
        ...

    def observe(self, shape: BatchShape, predicted_s: float, measured_s: float) -> None:
        """Fold in a measured iteration (`predicted_s`: what `predict(shape)` gave its plan): corrects bias,
        tracks the recent error."""
        ...

    def margin(self, num_decodes: int = 1) -> float:
        """Relative safety margin a planner should add to the predicted time of an iteration that carries
        a prefill chunk (the only kind it sizes) beside `num_decodes` decodes: a high quantile of recent
        under-predictions, higher the more decodes an overrun would delay."""
        ...


def largest_chunk(model: LatencyModel, shape: BatchShape, start: int, cap: int, limit_s: float) -> int:
    """The most prefill tokens (≤ cap, after `start` cached ones) that can join `shape` with the iteration
    still predicted within `limit_s`; 0 if none. Predicted time grows with the chunk, nearly in proportion: so the
    whole `cap` is tried first (the common case when the TBT is loose or the prompt's rest is short), then the
    bracket is narrowed by interpolation, each guess checked against its neighbour, with a bisection whenever a
    step fails to halve it (a few predictions where a plain bisection takes a dozen: admission asks this for every
    replica at every arrival)."""
    if cap <= 0:
        return 0
    high_s = model.predict(shape.with_chunk(cap, start))
    if high_s <= limit_s:
        return cap
    low, high, low_s = 0, cap, model.predict(shape)  # low fits (0 tokens: the answer if 1 does not), high does not
    bisect_next = False
    while high - low > 1:
        if bisect_next or high_s <= low_s:
            mid = (low + high) // 2
        else:
            mid = min(max(low + int((limit_s - low_s) / (high_s - low_s) * (high - low)), low + 1), high - 1)
        width = high - low
        mid_s = model.predict(shape.with_chunk(mid, start))
        if mid_s <= limit_s:
            low, low_s = mid, mid_s
            if mid + 1 < high:  # the answer is often the guess itself
                next_s = model.predict(shape.with_chunk(mid + 1, start))
                if next_s > limit_s:
                    return mid
                low, low_s = mid + 1, next_s
        else:
            high, high_s = mid, mid_s
            if mid - 1 > low:
                previous_s = model.predict(shape.with_chunk(mid - 1, start))
                if previous_s <= limit_s:
                    return mid - 1
                high, high_s = mid - 1, previous_s
        bisect_next = 2 * (high - low) > width
    return low


def _regime(shape: BatchShape) -> str:
    return "prefill" if shape.num_prefill_tokens else "decode"


def _features(shape: BatchShape, knots: tuple[int, ...]) -> list[float]:
    """1, tokens, one hinge per knot (GEMMs go from weight-bandwidth bound to compute bound as the
    batch grows, so time is piecewise linear in tokens), decodes (each also samples: an LM-head row
    over the vocabulary), prefill attention, prefill context, decode context."""
    tokens = shape.num_tokens
    return [1.0, tokens, *(max(0, tokens - k) for k in knots), shape.num_decodes, shape.prefill_attention,
            shape.prefill_context, shape.decode_context]


def feature_names(knots: tuple[int, ...]) -> list[str]:
    return ["constant", "tokens", *(f"tokens_over_{k}" for k in knots), "decodes", "prefill_attention",
            "prefill_context", "decode_context"]


MIN_SAMPLES = 20  # errors seen before the margin is read from them
# An iteration measured at more than this times its prediction counts as exactly this much, in the margin and in
# the online correction: beyond it the error is a stall of the machine, not a misjudged shape, which no margin
# short of idling covers, and taken whole one stall held the margin high for the rest of a run. A persistent
# slowdown is still learned: the surprise is taken against the corrected prediction, so each iteration moves the
# correction up to this factor further.
MAX_SURPRISE = 2.0


@dataclass
class Calibration:
    """Online correction for one regime: a slow multiplicative bias, the EWMA of log measured/predicted (how far
    this regime drifted from its profile)."""

    alpha: float = 0.05  # EWMA weight of the newest iteration
    log_bias: float = 0.0

    def learn(self, log_ratio: float) -> float:
        """Move the bias toward log(measured / profile); returns what the bias does not explain."""
        self.log_bias += self.alpha * (log_ratio - self.log_bias)
        return log_ratio - self.log_bias


@dataclass
class ErrorWindow:
    """The relative errors of recent predictions (measured / predicted - 1) of every iteration, whatever its
    regime, kept in arrival order and sorted, so the margin is an index, not a sort (the scheduler reads it every
    iteration).

    One window for both regimes: the margin lives in the tail, and the tail is the machine's, not the shape's (a
    rare iteration runs far over its prediction, with a chunk or without), so pooled it is read from all the
    samples, most of them decode-only. Measurements behind the constants: benchmarks/README.md."""

    window: int = 1000
    # The p99, not the worst recent error: one random spike would hold the margin up for a whole window.
    margin_quantile: float = 0.99
    # An overrun delays every running decode past its TBT (and a request's P99 over < 100 gaps is its worst one).
    # Beyond `base_decodes` decodes the quantile's tail shrinks in proportion, so the requests an overrun is
    # expected to hit stay the same: the p99.8 with 25 decodes, the p99.9 with 50.
    base_decodes: int = 5
    # The prior for the p99 (about that of serving replays' errors): the margin until `MIN_SAMPLES` errors are in,
    # then a floor under the quantile while the window is too short to hold it (1 / (1 - quantile) errors).
    initial_margin: float = 0.3
    # Beyond the p99 the prior's tail is exponential (peaks over a threshold), this much per e-fold: with one flat
    # floor for every quantile, chunks beside many decodes were sized for a p99 longer than a short overload lasts.
    prior_tail: float = 0.12
    # With this many errors beyond its p99, a quantile deeper than the window holds is extrapolated from them (the
    # prior's tail shape, the window's own threshold and scale): the prior as a permanent floor cost capacity
    # where predictions are exact.
    min_exceedances: int = 10
    errors: deque[float] = field(default_factory=deque)  # newest last
    _sorted: list[float] = field(default_factory=list, repr=False)  # the same errors, ascending

    def observe(self, predicted_s: float, measured_s: float) -> None:
        """Record the error of a prediction the planner used."""
        if predicted_s <= 0 or measured_s <= 0:
            return
        error = min(measured_s / predicted_s, MAX_SURPRISE) - 1
        self.errors.append(error)
        bisect.insort(self._sorted, error)
        if len(self.errors) > self.window:
            del self._sorted[bisect.bisect_left(self._sorted, self.errors.popleft())]

    def margin(self, num_decodes: int = 1) -> float:
        """A quantile of recent errors, at least 0: the `margin_quantile`, its tail shrunk beyond `base_decodes`
        decodes. Where the window is too short to hold that quantile: extrapolated from its errors beyond the
        p99 once it holds `min_exceedances` of them, else at least the prior for that quantile."""
        values = self._sorted
        tail = min(1.0, self.base_decodes / max(1, num_decodes))  # of 1 - margin_quantile
        quantile = 1 - (1 - self.margin_quantile) * tail
        if len(values) < MIN_SAMPLES:
            return self._prior(tail)
        if len(values) * (1 - quantile) >= 1:
            return max(0.0, self._quantile(quantile))
        exceedances = int(len(values) * (1 - self.margin_quantile))
        if exceedances < self.min_exceedances:
            return max(self._prior(tail), self._quantile(quantile))
        # Peaks over the p99: exponential beyond it, its scale the mean excess of the errors above it
        threshold = self._quantile(self.margin_quantile)
        scale = sum(values[-exceedances:]) / exceedances - threshold
        return min(MAX_SURPRISE - 1, max(0.0, threshold - scale * math.log(tail)))

    def _prior(self, tail: float) -> float:
        """The prior for the quantile whose tail is `tail` of the p99's: exponential beyond the p99."""
        return self.initial_margin - self.prior_tail * math.log(tail)

    def _quantile(self, quantile: float) -> float:
        """Of the window, interpolated linearly between order statistics as numpy's default."""
        values = self._sorted
        position = quantile * (len(values) - 1)
        low = int(position)
        high = min(low + 1, len(values) - 1)
        return values[low] + (values[high] - values[low]) * (position - low)


@dataclass
class LinearLatencyModel:
    """time = Σ coefficient × feature (see `_features`), times the online bias. Fitted by `fit`, saved as JSON."""

    coefficients: list[float]
    knots: tuple[int, ...] = ()
    key: dict[str, Any] = field(default_factory=dict)  # what it was measured on: model, dtype, device, threads
    fit_error: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[BatchShape, float]] = field(default_factory=list)  # the measurements it was fitted on
    # Online correction per regime: iterations with a prefill chunk and decode-only ones drift apart in serving.
    calibrations: dict[str, Calibration] = field(
        default_factory=lambda: {"prefill": Calibration(), "decode": Calibration()})
    # On top of each regime's slow bias, one fast factor shared by both: the machine's recent speed. A slow spell
    # lasts many iterations and slows prefills and decodes alike, so the rare prefill iterations learn it from the
    # decodes around them.
    drift_alpha: float = 0.3
    log_drift: float = 0.0
    errors: ErrorWindow = field(default_factory=ErrorWindow)  # of every prediction: the margin

    def __post_init__(self) -> None:
        self.knots = tuple(self.knots)
        if len(self.coefficients) != len(feature_names(self.knots)):
            raise ValueError(f"{len(self.coefficients)} coefficients for features {feature_names(self.knots)}")

    def fresh(self) -> LinearLatencyModel:
        """A copy with no online correction yet: each scheduler and simulated executor gets its own, so none
        learns from another's iterations."""
        return LinearLatencyModel(list(self.coefficients), self.knots, dict(self.key), dict(self.fit_error),
                                  self.samples)

    def predict_raw(self, shape: BatchShape) -> float:
        # Σ coefficient × `_features(shape)`, unrolled: the scheduler asks this several times an iteration
        c = self.coefficients
        tokens = shape.num_prefill_tokens + shape.num_decodes
        seconds = c[0] + c[1] * tokens
        for i, knot in enumerate(self.knots, start=2):
            if tokens > knot:
                seconds += c[i] * (tokens - knot)
        j = len(self.knots) + 2
        seconds += (c[j] * shape.num_decodes + c[j + 1] * shape.prefill_attention + c[j + 2] * shape.prefill_context
                    + c[j + 3] * shape.decode_context)
        return max(1e-6, seconds)

    def predict(self, shape: BatchShape) -> float:
        return self.predict_raw(shape) * math.exp(self.calibrations[_regime(shape)].log_bias + self.log_drift)

    def observe(self, shape: BatchShape, predicted_s: float, measured_s: float) -> None:
        self.errors.observe(predicted_s, measured_s)
        if measured_s > 0 and predicted_s > 0:
            calibration = self.calibrations[_regime(shape)]
            # log(measured / profile), with the surprise over the corrected prediction capped at MAX_SURPRISE
            surprise = math.log(min(measured_s / predicted_s, MAX_SURPRISE))
            residual = calibration.learn(calibration.log_bias + self.log_drift + surprise)
            self.log_drift += self.drift_alpha * (residual - self.log_drift)

    def margin(self, num_decodes: int = 1) -> float:
        return self.errors.margin(num_decodes)

    @classmethod
    def fit(cls, shapes: list[BatchShape], times_s: list[float], knots: tuple[int, ...] = (),
            key: dict[str, Any] | None = None,
            runs: list[tuple[list[BatchShape], float]] = ()) -> LinearLatencyModel:
        """Least squares on relative error (rows weighted by 1/time), so short decode iterations count as
        much as long prefills. `runs` adds measurements of several iterations back to back (e.g. a prompt
        prefilled in chunks) known only by their total time: the model is linear, so their features add."""
        rows = [_features(s, knots) for s in shapes]
        rows += [np.sum([_features(s, knots) for s in run], axis=0).tolist() for run, _ in runs]
        x = np.array(rows, dtype=np.float64)
        y = np.array(list(times_s) + [total for _, total in runs], dtype=np.float64)
        if len(y) < x.shape[1]:
            raise ValueError(f"{len(y)} measurements cannot fit {x.shape[1]} coefficients")
        coefficients, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
        model = cls([float(c) for c in coefficients], knots, key or {}, samples=list(zip(shapes, times_s)))
        errors = np.abs(x @ coefficients / y - 1)
        model.fit_error = {"p50": float(np.quantile(errors, 0.5)), "p90": float(np.quantile(errors, 0.9)),
                           "max": float(errors.max())}
        return model

    def to_json(self) -> dict[str, Any]:
        return {"kind": "linear", "key": self.key, "knots": list(self.knots),
                "features": feature_names(self.knots), "coefficients": self.coefficients, "fit_error": self.fit_error,
                "samples": [{**shape._asdict(), "seconds": seconds} for shape, seconds in self.samples]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LinearLatencyModel:
        if data.get("kind") != "linear":
            raise ValueError(f"unknown latency profile kind {data.get('kind')!r}")
        samples = [(BatchShape(**{k: v for k, v in row.items() if k != "seconds"}), row["seconds"])
                   for row in data.get("samples", [])]
        return cls(list(data["coefficients"]), tuple(data.get("knots", ())), dict(data.get("key", {})),
                   dict(data.get("fit_error", {})), samples)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> LinearLatencyModel:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"cannot read latency profile {path}: {error}") from error
