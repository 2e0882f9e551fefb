"""`pacer sim run | capacity | compare` end to end on a fabricated profile: reports and plots like the bench's."""

from __future__ import annotations

import json

import pytest

from pacer.cli import main
from tests.sim.test_simulator import linear

WORKLOAD = ["--num-requests", "40", "--lengths", "uniform", "--prompt-tokens", "300", "--output-tokens", "30",
            "--slo-ttft-ms", "800", "--slo-tbt-ms", "100", "--kv-blocks", "128"]


@pytest.fixture()
def profile(tmp_path):
    path = tmp_path / "profile.json"
    linear().save(path)
    return str(path)


def test_sim_run_writes_the_bench_report_and_plots(profile, tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["sim", "run", "--profile", profile, *WORKLOAD, "--rate", "5", "--scheduler", "slo",
                 "--out", str(out), "--plots", str(tmp_path / "plots")]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"workload", "sim", "slo", "summary", "requests"}
    assert report["sim"]["scheduler"]["scheduler"] == "slo" and report["sim"]["num_iterations"] > 0
    assert report["summary"]["num_requests"] == 40
    assert any(p.suffix == ".png" for p in (tmp_path / "plots").iterdir())
    assert "x real time" in capsys.readouterr().out


def test_sim_compare_and_capacity(profile, tmp_path, capsys):
    out = tmp_path / "compare.json"
    assert main(["sim", "compare", "--profile", profile, *WORKLOAD, "--rate", "5", "--schedulers", "fcfs,slo",
                 "--config", "small=--scheduler sarathi --max-num-batched-tokens 64", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"fcfs", "slo", "small"}
    assert "| goodput (req/s) |" in capsys.readouterr().out
    out = tmp_path / "capacity.json"
    assert main(["sim", "capacity", "--profile", profile, *WORKLOAD, "--scheduler", "sarathi", "--slo-tbt-ms", "1000", "--min-rate", "1",
                 "--max-rate", "4", "--max-trials", "5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["capacity"] >= 1 and len(report["trials"]) <= 5


def test_sim_errors_are_clear(profile, capsys):
    assert main(["sim", "run", *WORKLOAD]) == 2
    assert "needs --profile" in capsys.readouterr().err
    assert main(["sim", "run", "--profile", profile, "--num-requests", "5"]) == 2
    assert "give --kv-blocks" in capsys.readouterr().err
    assert main(["sim", "compare", "--profile", profile, *WORKLOAD, "--config", "x=--bogus 1"]) == 2
    assert "unknown flags --bogus" in capsys.readouterr().err


def test_without_the_ttft_slo_nothing_is_refused_but_ttft_still_judges(profile, tmp_path):
    reports = {}
    for flag in ("--send-ttft-slo", "--no-send-ttft-slo"):
        out = tmp_path / f"{flag}.json"
        assert main(["sim", "run", "--profile", profile, *WORKLOAD, "--rate", "20", "--scheduler", "slo", flag,
                     "--out", str(out)]) == 0
        reports[flag] = json.loads(out.read_text())["summary"]
    assert reports["--send-ttft-slo"]["num_rejected"] > 0  # overload: admission refuses
    assert reports["--no-send-ttft-slo"]["num_rejected"] == 0
    assert reports["--no-send-ttft-slo"]["ttft_attainment"] < 1  # the TTFT SLO was not promised, but still counts
