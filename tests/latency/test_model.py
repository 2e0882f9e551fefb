"""The latency model: batch shapes, the fit, the online correction, the chunk search."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pacer.latency.model import (
    MAX_SURPRISE,
    BatchShape,
    ErrorWindow,
    LinearLatencyModel,
    feature_names,
    largest_chunk,
)


def _random_shapes(rng: np.random.Generator, n: int) -> list[BatchShape]:
    shapes = []
    for _ in range(n):
        shape = BatchShape()
        for _ in range(rng.integers(0, 20)):
            shape = shape.with_decode(int(rng.integers(1, 2000)))
        for _ in range(rng.integers(0 if shape.num_decodes else 1, 3)):
            shape = shape.with_chunk(int(rng.integers(2, 512)), int(rng.integers(0, 1500)))
        shapes.append(shape)
    return shapes


def test_fit_recovers_a_known_piecewise_linear_model():
    knots = (2, 16, 64)
    truth = LinearLatencyModel([0.03, 0.01, -0.008, 0.0005, -0.0003, 0.002, 5e-7, 2e-5, 1e-6], knots)
    shapes = _random_shapes(np.random.default_rng(0), 200)
    fitted = LinearLatencyModel.fit(shapes, [truth.predict(s) for s in shapes], knots, key={"model": "m"})
    assert fitted.coefficients == pytest.approx(truth.coefficients, rel=1e-6, abs=1e-12)
    assert fitted.fit_error["max"] < 1e-9 and len(fitted.samples) == 200
    assert len(feature_names(knots)) == len(truth.coefficients)


def test_profile_json_round_trip(tmp_path):
    shapes = _random_shapes(np.random.default_rng(1), 30)
    model = LinearLatencyModel.fit(shapes, [0.05 + 0.001 * s.num_tokens for s in shapes], (16,),
                                   key={"model": "tiny", "threads": 2})
    model.save(tmp_path / "p.json")
    loaded = LinearLatencyModel.load(tmp_path / "p.json")
    assert loaded.coefficients == model.coefficients and loaded.key == model.key and loaded.samples == model.samples
    assert all(loaded.predict(s) == pytest.approx(model.predict(s)) for s in shapes)
    (tmp_path / "bad.json").write_text('{"kind": "cubic"}')
    with pytest.raises(ValueError, match="unknown latency profile kind"):
        LinearLatencyModel.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read latency profile"):
        LinearLatencyModel.load(tmp_path / "missing.json")


def test_online_correction_learns_a_constant_bias_and_tracks_the_error():
    model = LinearLatencyModel([0.1, 0.0, 0.0, 0.0, 0.0, 0.0], ())
    shape = BatchShape().with_decode(10)
    for _ in range(1200):  # the machine is 30 % slower than profiled (the window keeps the last 1000)
        model.observe(shape, model.predict(shape), 0.13)
    assert model.predict(shape) == pytest.approx(0.13, rel=1e-3)
    # the corrected predictions are now right: the window's median |error| is tiny
    assert np.quantile(np.abs(model.errors.errors), 0.5) < 1e-3
    chunk = BatchShape().with_chunk(64, 0)  # iterations with a prefill are corrected on their own
    assert model.predict(chunk) == pytest.approx(0.1)  # no history yet
    for _ in range(100):
        model.observe(chunk, model.predict(chunk), 0.08)
    # each regime keeps its own bias; the shared factor for the machine's recent speed has settled back
    assert model.predict(chunk) == pytest.approx(0.08, rel=1e-2) and model.predict(shape) == pytest.approx(0.13, rel=1e-2)


def test_a_slow_spell_seen_in_decodes_carries_over_to_prefills():
    model = LinearLatencyModel([0.1, 0.0, 0.0, 0.0, 0.0, 0.0], ())
    decode, chunk = BatchShape().with_decode(10), BatchShape().with_chunk(64, 0)
    for _ in range(10):  # the machine turns 40 % slower (another job); only decodes run meanwhile
        model.observe(decode, model.predict(decode), 0.14)
    assert model.predict(chunk) > 0.12  # the next prefill is expected slow too, though none was seen
    assert model.predict(decode) == pytest.approx(0.14, rel=0.05)
    for _ in range(30):  # and back to normal
        model.observe(decode, model.predict(decode), 0.1)
    assert model.predict(chunk) == pytest.approx(0.1, rel=0.05)


def test_margin_is_a_high_quantile_of_under_predictions():
    errors = ErrorWindow(margin_quantile=0.9)
    for i in range(100):
        errors.observe(1.0, 1.2 if i % 10 == 0 else 1.0)  # one iteration in ten runs 20 % long
    assert errors.margin() == pytest.approx(0.02)  # the 90th percentile falls between 0 and 0.2
    assert ErrorWindow(margin_quantile=0.95, initial_margin=0.25).margin() == 0.25  # no history yet: the default
    for i in range(100):
        errors.observe(1.0, 1.2 if i % 2 == 0 else 1.0)
    assert errors.margin() == pytest.approx(0.2)


def test_the_prior_is_a_floor_until_the_window_can_hold_the_quantile():
    errors = ErrorWindow(initial_margin=0.3, prior_tail=0.12)  # the p99 with up to 5 decodes, the p99.8 with 25
    p998 = 0.3 + 0.12 * math.log(5)  # the prior's exponential tail, one fifth as deep as the p99's
    assert errors.margin(5) == 0.3 and errors.margin(25) == pytest.approx(p998)  # no history yet: the prior
    for _ in range(100):
        errors.observe(1.0, 1.1)
    assert errors.margin(5) == pytest.approx(0.1)  # 100 errors hold a p99
    assert errors.margin(25) == pytest.approx(p998)  # but not a p99.8: their largest would be read as one
    for _ in range(400):
        errors.observe(1.0, 1.1)
    assert errors.margin(25) == pytest.approx(0.1)


def test_a_quantile_deeper_than_the_window_is_extrapolated_from_its_tail():
    """Beside 128 decodes the margin asks a p99.96, which 1,000 errors cannot hold: once they hold ten beyond
    their p99 it is read from an exponential fitted to those, not from the prior."""
    exact = ErrorWindow()
    for _ in range(999):
        exact.observe(1.0, 1.0)  # a noiseless executor: every prediction right
    assert exact.margin(128) == pytest.approx(exact.initial_margin + exact.prior_tail * math.log(128 / 5))
    exact.observe(1.0, 1.0)  # the thousandth: ten errors beyond the p99
    assert exact.margin(128) == 0.0  # was the prior, 0.69, for good

    scale = 0.1  # errors exponential with mean 0.1, at their expected quantiles
    window = ErrorWindow()
    for i in range(1000):
        window.observe(1.0, 1.0 - scale * math.log(1 - (i + 0.5) / 1000))
    for decodes in (64, 128, 256):
        quantile = 1 - 0.01 * 5 / decodes
        assert window.margin(decodes) == pytest.approx(-scale * math.log(1 - quantile), rel=0.03)

    heavy = ErrorWindow()
    for i in range(1000):
        heavy.observe(1.0, 1.5 + i / 2000 if i % 50 == 0 else 1.0)  # one in 50 runs 50-98 % long
    assert heavy.margin(128) == MAX_SURPRISE - 1  # no deeper than the largest error it could ever see


def test_one_window_for_both_regimes():
    """The tail is the machine's: an overrun of a decode-only iteration raises the margin of chunked ones."""
    model = LinearLatencyModel([0.1, 0.0, 0.0, 0.0, 0.0, 0.0], ())
    decode, chunk = BatchShape().with_decode(10), BatchShape().with_chunk(64, 0)
    for i in range(200):
        shape = chunk if i % 10 == 0 else decode
        model.observe(shape, model.predict(shape), model.predict(shape) * (1.5 if i % 50 == 49 else 1.0))
    assert len(model.errors.errors) == 200
    assert model.margin(5) > 0.3  # four decode-only overruns of 50 % in 200 iterations: above the p99


def test_the_more_decodes_an_overrun_would_delay_the_higher_the_quantile():
    window = ErrorWindow(window=1001)
    for i in range(1001):
        window.observe(1.0, 1.0 + i / 1000)  # errors 0, 0.001, ..., 1.0
    assert window.margin() == window.margin(5) == pytest.approx(0.99)  # a few decodes: the p99
    assert window.margin(25) == pytest.approx(0.998)  # 5x the decodes, a 5x thinner tail
    assert window.margin(50) == pytest.approx(0.999)


def test_largest_chunk_is_the_most_tokens_within_the_limit():
    model = LinearLatencyModel([0.01, 0.001, 0.0, 0.0, 0.0, 0.0], ())  # 10 ms + 1 ms per token
    decodes = BatchShape().with_decode(5).with_decode(5)  # 12 ms
    assert largest_chunk(model, decodes, 0, 512, 0.1) == 88
    assert largest_chunk(model, decodes, 0, 50, 0.1) == 50
    assert largest_chunk(model, decodes, 0, 512, 0.011) == 0
    assert largest_chunk(model, BatchShape(), 0, 512, math.inf) == 512


def test_largest_chunk_agrees_with_trying_every_size():
    """The interpolating search gives the bisection's answer on a model with hinges, attention and a bias."""
    import random

    rng = random.Random(0)
    model = LinearLatencyModel([0.01, 4e-4, 3e-4, -1e-4, 2e-4, 1e-7, 2e-6, 1e-8], (64, 256))
    model.calibrations["prefill"].log_bias = 0.2
    for _ in range(300):
        shape = BatchShape()
        for _ in range(rng.randint(0, 30)):
            shape = shape.with_decode(rng.randint(1, 2000))
        if rng.random() < 0.3:
            shape = shape.with_chunk(rng.randint(2, 300), rng.randint(0, 500))
        start, cap, limit = rng.randint(0, 1500), rng.randint(0, 600), rng.uniform(0.005, 0.4)
        fitting = [c for c in range(1, cap + 1) if model.predict(shape.with_chunk(c, start)) <= limit]
        assert largest_chunk(model, shape, start, cap, limit) == max(fitting, default=0)


def test_predict_equals_the_features_dot_the_coefficients():
    from pacer.latency.model import _features

    model = LinearLatencyModel([0.01, 1e-3, 2e-4, -1e-4, 5e-5, 3e-4, 1e-7, 2e-6, 1e-8], (2, 16, 64))
    for shape in (BatchShape().with_decode(100), BatchShape().with_chunk(300, 50).with_decode(7).with_decode(9),
                  BatchShape().with_chunk(17, 0)):
        expected = sum(c * x for c, x in zip(model.coefficients, _features(shape, model.knots)))
        assert model.predict_raw(shape) == pytest.approx(expected, rel=1e-12)


def test_margin_is_numpys_quantile_of_the_rolling_window():
    import random

    rng = random.Random(0)
    window = ErrorWindow(window=100)
    for _ in range(350):
        window.observe(1.0, rng.uniform(0.7, 1.5))
        assert sorted(window.errors) == window._sorted
    assert len(window.errors) == 100
    assert window.margin() == pytest.approx(float(np.quantile(list(window.errors), window.margin_quantile)))


def test_a_stall_counts_as_twice_the_prediction_and_a_lasting_slowdown_is_still_learned():
    model = LinearLatencyModel([0.1, 0.0, 0.0, 0.0, 0.0, 0.0], ())
    chunk = BatchShape().with_chunk(64, 0)
    for _ in range(100):
        model.observe(chunk, model.predict(chunk), 0.1)
    model.observe(chunk, model.predict(chunk), 5.0)  # the process stopped for 5 s in one iteration
    assert model.errors.errors[-1] == MAX_SURPRISE - 1
    assert model.margin(50) <= MAX_SURPRISE - 1  # was 49: every later chunk planned for a 50x overrun
    assert model.predict(chunk) < 0.1 * MAX_SURPRISE
    for _ in range(30):  # the machine is now 5x slower for good
        model.observe(chunk, model.predict(chunk), 0.5)
    assert model.predict(chunk) == pytest.approx(0.5, rel=0.1)
