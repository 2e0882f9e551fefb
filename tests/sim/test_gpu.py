"""GPU profiles from published measurements (benchmarks/data/profiles), and the KV capacity a model leaves on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacer.latency.model import BatchShape
from pacer.sim.gpu import A100_80GB, MODELS, check_capacity_table, kv_capacity_tokens, load_sim_profile

PROFILES = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "profiles"


def test_kv_capacity_matches_distserve_table():
    rows = check_capacity_table(PROFILES / "distserve-a100" / "max_num_tokens.csv")
    assert len(rows) >= 10
    for model, tp, theirs, ours in rows:
        assert ours == pytest.approx(theirs, rel=0.06), (model, tp)


def test_kv_capacity_refuses_a_model_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        kv_capacity_tokens(MODELS["facebook/opt-175b"], A100_80GB, 2)


def test_sarathi_yi34b_profile_fits_the_measurements():
    latency, capacity = load_sim_profile(str(PROFILES / "sarathi-a100"))
    assert latency.fit_error["p50"] < 0.05 and latency.fit_error["p90"] < 0.12
    assert 250_000 < capacity < 350_000  # 2 x 80 GB x 0.9 less 69 GB of weights, 240 KiB a token
    decode128 = BatchShape()
    for _ in range(128):
        decode128 = decode128.with_decode(0)
    assert latency.predict(decode128) == pytest.approx(0.189, rel=0.05)  # figure 2: 189.3 ms
    assert latency.predict(BatchShape().with_chunk(1024, 0)) == pytest.approx(0.214, rel=0.05)
    with_context = BatchShape().with_decode(4096)
    assert latency.predict(with_context) > latency.predict(BatchShape().with_decode(0))


def test_distserve_profile_refits_the_coefficients():
    path = PROFILES / "distserve-a100" / "profiler-a100-80g.distserve.json"
    latency, capacity = load_sim_profile(str(path), "facebook/opt-13b", 1)
    assert latency.fit_error["p90"] < 0.1
    assert capacity == kv_capacity_tokens(MODELS["facebook/opt-13b"], A100_80GB, 1)
    # DistServe: prefill of one 512-token prompt = a + b*512 + c*512^2 ms
    a, b, c = 18.10254647486372, 0.1019122572698738, 7.122264314252114e-06
    expected = (a + b * 512 + c * 512**2) / 1e3
    assert latency.predict(BatchShape().with_chunk(512, 0)) == pytest.approx(expected, rel=0.1)
    with pytest.raises(ValueError, match="no facebook/opt-13b at tensor parallel 3"):
        load_sim_profile(str(path), "facebook/opt-13b", 3)


def test_a_pacer_profile_has_no_kv_capacity_and_other_files_are_refused(tmp_path):
    from tests.sim.test_simulator import linear

    linear().save(tmp_path / "p.json")
    latency, capacity = load_sim_profile(str(tmp_path / "p.json"))
    assert capacity is None and latency.coefficients == linear().coefficients
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="neither"):
        load_sim_profile(str(tmp_path / "x.json"))
    with pytest.raises(ValueError, match="not Sarathi-Serve"):
        load_sim_profile(str(tmp_path))
