"""`pacer profile` and the profile `pacer serve` picks, on the tiny model."""

from __future__ import annotations

import pytest

from pacer.config import EngineConfig
from pacer.engine.builder import build_engine
from pacer.engine.profile import QUICK_GRID, default_profile_path
from pacer.latency.model import LinearLatencyModel
from pacer.model.runner import resolve_dtype


def test_profile_measures_the_grid_and_fits(tiny_profile):
    model = LinearLatencyModel.load(tiny_profile)
    assert model.key["model"].endswith("-dir")  # an HF-style directory, not a .gguf file
    auto = str(resolve_dtype("auto", "cpu")).removeprefix("torch.")  # bfloat16 on CPUs that compute it natively
    assert model.key["threads"] == 1 and model.key["dtype"] == auto and model.key["device"] == "cpu"
    assert len(model.samples) == model.key["num_shapes"] >= 8
    assert all(seconds > 0 for _, seconds in model.samples)
    # the fit is close on its own grid (a ~1 ms model is noisy, so loosely)
    assert model.fit_error["p50"] < 0.3
    # predictions grow with the work
    small, large = model.samples[0][0], model.samples[0][0].with_chunk(200, 0)
    assert model.predict(large) > model.predict(small)


def test_the_grid_fits_a_short_context():
    batches = QUICK_GRID.batches(max_tokens=10_000, max_model_len=256)
    assert batches and all(n + ctx <= 256 for batch in batches for n, ctx in batch)
    assert all(sum(n + ctx for n, ctx in batch) <= 10_000 for batch in batches)


def test_serve_picks_the_cached_profile_or_measures_one(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    options = {"model": str(tiny_model_dir), "threads": 1, "num_blocks": 64, "max_model_len": 128}
    engine, _ = build_engine(EngineConfig.from_kwargs(scheduler="sarathi", **options))
    assert engine.scheduler.latency is None  # nothing cached, and sarathi does not need one
    engine, _ = build_engine(EngineConfig.from_kwargs(scheduler="slo", **options))
    measured = engine.scheduler.latency
    assert measured is not None and default_profile_path(measured.key).is_file()
    engine, _ = build_engine(EngineConfig.from_kwargs(scheduler="sarathi", **options))
    assert engine.scheduler.latency.coefficients == measured.coefficients  # cached now: every policy gets it
    assert measured.key["kernels"] == engine.executor.kernels and measured.key["family"] == "llama"

    # a profile measured with other kernels (an older build) is measured again, not trusted
    stale = LinearLatencyModel.load(default_profile_path(measured.key))
    stale.key["kernels"] = "something-older"
    stale.save(default_profile_path(measured.key))
    engine, _ = build_engine(EngineConfig.from_kwargs(scheduler="sarathi", **options))
    assert engine.scheduler.latency is None  # not trusted, and sarathi does not need one
    engine, _ = build_engine(EngineConfig.from_kwargs(scheduler="slo", **options))
    assert engine.scheduler.latency.key["kernels"] == engine.executor.kernels
    assert LinearLatencyModel.load(default_profile_path(measured.key)).key["kernels"] == engine.executor.kernels
    with pytest.raises(ValueError, match="plan with a latency model"):
        build_engine(EngineConfig.from_kwargs(scheduler="slo", latency_profile="none", **options))
