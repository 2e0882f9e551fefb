"""The pre-registered suite: its file parses, capacities and verdicts follow their definitions, and one small suite
runs end to end against a live pacer on the tiny model."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from pacer.bench.metrics import summarize
from pacer.bench.suite import RunResult, capacity, compare, format_tables, load_suite, make_report
from pacer.cli import main
from tests.bench.test_metrics import record, stream

REPO = Path(__file__).resolve().parents[2]


def test_the_repositorys_suite_parses_and_names_what_the_issue_asks():
    suite = load_suite(REPO / "benchmarks" / "suite.toml")
    assert suite.repeats >= 3 and suite.attainment_bar == 0.9
    assert (suite.slo.ttft_ms, suite.slo.tpot_ms, suite.slo.tbt_ms) == (3000, 200, 500)
    assert {"chat", "bursty", "prefix", "mixed"} <= set(suite.workloads)
    for workload in suite.workloads.values():
        assert Path(workload.config.trace).exists(), f"{workload.name}: the repository ships its trace"
    assert suite.workloads["mixed"].config.slo_classes and suite.workloads["mixed"].kinds == ("tpot",)
    assert {"pacer", "pacer-slo", "vllm", "vllm-valve"} <= set(suite.servers)
    assert "--max-num-queued-tokens" in suite.servers["vllm-valve"].command


def test_a_mistake_in_the_file_names_its_table(tmp_path):
    path = tmp_path / "suite.toml"
    path.write_text('[slo]\nttft_ms = 1\ntpot_ms = 1\ntbt_ms = 1\n[servers.a]\ncommand = ["x"]\n'
                    '[workloads.w]\nrates = [1]\nbogus = 3\n')
    with pytest.raises(ValueError, match=r"\[workloads.w\].*bogus"):
        load_suite(path)


def test_capacity_is_the_highest_rate_met_there_and_below():
    assert capacity({0.5: 1.0, 1.0: 0.95, 2.0: 0.5}, 0.9) == 1.0
    assert capacity({0.5: 1.0, 1.0: 0.8, 2.0: 0.95}, 0.9) == 0.5  # a lucky high rate after a miss does not count
    assert capacity({0.5: 0.7, 1.0: 0.95}, 0.9) == 0.0


def test_a_ratio_is_claimed_only_where_the_spreads_do_not_overlap():
    assert compare([1.0, 1.0, 1.5], [0.5, 0.5, 0.75]) == "2.00x"
    assert compare([0.5, 0.5], [1.0, 1.0]) == "0.50x"
    assert compare([1.0, 1.5], [0.5, 1.0]) == "level"


def _result(server: str, rate: float, repeat: int, good: int, n: int = 10) -> RunResult:
    records = [record(i, token_times_s=stream(0.0, 0.5 if i < good else 9.0, [0.05] * 3)) for i in range(n)]
    suite = load_suite(REPO / "benchmarks" / "suite.toml")
    summaries = {kind: summarize(records, suite.slo.judged(kind), 10.0, offered_rate=rate) for kind in ("tpot", "tbt")}
    return RunResult(server, "chat", rate, repeat, 0, summaries)


def test_the_report_takes_each_groups_best_and_says_level_where_spreads_overlap():
    suite = load_suite(REPO / "benchmarks" / "suite.toml")
    results = []
    for repeat in range(3):
        results += [_result("pacer", 0.25, repeat, 10), _result("pacer", 0.5, repeat, 10),
                    _result("pacer", 1.0, repeat, 9 if repeat else 5), _result("pacer", 1.5, repeat, 2),
                    _result("vllm", 0.25, repeat, 10), _result("vllm", 0.5, repeat, 5),
                    _result("vllm-b512", 0.25, repeat, 10), _result("vllm-b512", 0.5, repeat, 10),
                    _result("vllm-b512", 1.0, repeat, 5)]
    report = make_report(suite, results, {"vllm-valve": "not installed"}, 1.0)
    chat = report["workloads"]["chat/tpot"]
    assert chat["servers"]["pacer"]["capacity"] == [0.5, 1.0, 1.0]
    assert chat["servers"]["vllm"]["capacity"] == [0.25] * 3 and chat["best"] == {"vllm": "vllm-b512"}
    tables = format_tables(report)
    assert "| pacer | 100 % | 100 % | 90 [50-90] % | 20 % | 1 [0.5-1] |" in tables
    assert "- capacity, pacer against vllm-b512: level" in tables  # 0.5-1 against 0.5
    assert "vllm-valve: not installed" in tables
    json.dumps(report, allow_nan=False)


def test_a_small_suite_runs_end_to_end_against_a_live_pacer(tiny_model_dir, tmp_path, capsys):
    suite = tmp_path / "suite.toml"
    suite.write_text(f"""
[suite]
repeats = 2
window_s = 1.5
min_requests = 3
tokenizer_model = "{tiny_model_dir}"
[slo]
ttft_ms = 5000
tpot_ms = 5000
tbt_ms = 5000
[workloads.short]
rates = [2, 4]
arrival = "poisson"
lengths = "fixed"
prompt_tokens = 12
output_tokens = 6
max_model_len = 256
[servers.pacer]
command = ["{{python}}", "-m", "pacer.cli", "serve", "--port", "{{port}}", "--model", "{tiny_model_dir}",
           "--threads", "1", "--num-blocks", "64"]
[servers.absent]
requires = "{tmp_path}/no-such-venv/bin/python"
command = ["{tmp_path}/no-such-venv/bin/python"]
""")
    out = tmp_path / "out"
    assert main(["bench", "suite", str(suite), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"] == {"absent": f"not installed: {tmp_path}/no-such-venv/bin/python"}
    runs = report["runs"]
    assert [(r["rate"], r["repeat"]) for r in runs] == [(2.0, 0), (4.0, 0), (2.0, 1), (4.0, 1)]
    assert len({r["seed"] for r in runs}) == 4  # every run sends its own prompts
    assert all(r["summaries"]["tpot"]["slo_attainment"] == 1.0 for r in runs)
    assert all(r["prefix_cache_hit_rate"] is not None for r in runs)  # read from pacer's /metrics
    assert report["workloads"]["short/tpot"]["servers"]["pacer"]["capacity"] == [4.0, 4.0]
    with gzip.open(out / "records" / "pacer.json.gz", "rt") as f:
        raw = json.load(f)
    assert [len(r["requests"]) for r in raw] == [3, 6, 3, 6]
    assert all(req["output_tokens"] == 6 and len(req["token_times_s"]) == 6 for r in raw for req in r["requests"])
    assert "### short/tpot" in (out / "tables.md").read_text() and sys.executable not in capsys.readouterr().err
    # run again into the same folder: the kept records are read, not measured again, and give the same report
    assert main(["bench", "suite", str(suite), "--out", str(out)]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["workloads"] == report["workloads"] and "its records in" in capsys.readouterr().out
