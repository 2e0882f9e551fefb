"""`pacer bench` end to end against a live `pacer serve` on the tiny model."""

from __future__ import annotations

import itertools
import json
import sys

from pacer.cli import main
from tests.live_server import API_KEY


def test_bench_run_against_a_live_server(tiny_server, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["bench", "run", "--base-url", tiny_server.url, "--api-key", API_KEY, "--tokenizer", str(tiny_model_dir),
               "--num-requests", "12", "--arrival", "poisson", "--rate", "20", "--prompt-tokens", "16",
               "--output-tokens", "8", "--max-model-len", "256", "--slo-ttft-ms", "5000", "--slo-tbt-ms", "5000",
               "--out", str(out), "--plots", str(tmp_path / "plots")])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["latency_over_time.png", "tbt_cdf.png",
                                                                      "ttft_cdf.png"]
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["num_requests"] == 12 and summary["num_completed"] == 12 and summary["num_failed"] == 0
    assert summary["slo_attainment"] == 1.0 and summary["goodput"] > 0
    for record in report["requests"]:
        assert record["output_tokens"] == 8 and record["status"] == "ok"
        assert record["sent_s"] <= record["token_times_s"][0] <= record["finished_s"]
    assert "TTFT (ms)" in capsys.readouterr().out


def test_bench_counts_rejections_and_failures(tiny_server, tiny_model_dir, tmp_path):
    """Without the key every request is a 401: counted as failed by kind, and the run does not crash."""
    out = tmp_path / "report.json"
    rc = main(["bench", "run", "--base-url", tiny_server.url, "--model", tiny_server.model, "--tokenizer",
               str(tiny_model_dir), "--num-requests", "3", "--arrival", "concurrency", "--concurrency", "2",
               "--prompt-tokens", "4", "--output-tokens", "2", "--out", str(out)])
    summary = json.loads(out.read_text())["summary"]
    assert rc == 1 and summary["num_failed"] == 3 and summary["num_failed_by_kind"] == {"http_4xx": 3}


def test_capacity_search_against_a_live_server(tiny_server, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "capacity.json"
    rc = main(["bench", "capacity", "--base-url", tiny_server.url, "--api-key", API_KEY, "--tokenizer",
               str(tiny_model_dir), "--num-requests", "6", "--prompt-tokens", "8", "--output-tokens", "4",
               "--slo-ttft-ms", "10000", "--slo-tbt-ms", "10000", "--condition", "attainment", "--min-rate", "2",
               "--max-rate", "4", "--max-trials", "3", "--out", str(out), "--plots", str(tmp_path)])
    report = json.loads(out.read_text())
    assert rc == 0 and [t["rate"] for t in report["trials"]] == [2, 4, 8]
    assert report["capacity"] == 8 and all(t["met"] for t in report["trials"])
    assert len(report["curve"]) == 3 and "capacity (attainment): 8" in capsys.readouterr().out
    assert (tmp_path / "capacity.png").stat().st_size > 5000


def test_compare_starts_each_configuration_and_reports_side_by_side(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run1.json"
    rc = main(["bench", "compare", "--schedulers", "fcfs,sarathi", "--config",
               "small-budget=--scheduler sarathi --max-num-batched-tokens 16", "--server",
               f"external={sys.executable} -m pacer.cli serve --port {{port}} --model {tiny_model_dir} --threads 1",
               "--server-args", f"--model {tiny_model_dir} --threads 1 --num-blocks 64", "--tokenizer",
               str(tiny_model_dir), "--num-requests", "6", "--arrival", "concurrency", "--concurrency", "3",
               "--prompt-tokens", "24", "--output-tokens", "4", "--out", str(out), "--plots", str(tmp_path)])
    report = json.loads(out.read_text())
    assert rc == 0 and list(report["runs"]) == ["fcfs", "sarathi", "small-budget", "external"]
    assert all(run["summary"]["num_completed"] == 6 for run in report["runs"].values())
    table = capsys.readouterr().out
    assert "| | fcfs | sarathi | small-budget | external |" in table and "goodput (req/s)" in table
    assert (tmp_path / "compare_tbt_cdf.png").stat().st_size > 5000
    # each server's log and final /metrics are named after the report, so runs sharing a folder keep their own
    assert "pacer:iteration_time_seconds" in (tmp_path / "run1-external.metrics.txt").read_text()
    assert (tmp_path / "run1-fcfs.log").stat().st_size > 0


def test_a_multi_turn_run_finds_each_conversation_so_far_in_the_servers_prefix_cache(tiny_server, tiny_model_dir,
                                                                                       tmp_path):
    out = tmp_path / "report.json"
    rc = main(["bench", "run", "--base-url", tiny_server.url, "--api-key", API_KEY, "--tokenizer", str(tiny_model_dir),
               "--num-requests", "6", "--arrival", "concurrency", "--concurrency", "2", "--turns", "3",
               "--prompt-tokens", "40", "--output-tokens", "8", "--max-model-len", "240", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["summary"]["num_completed"] == 6
    turns = [(r["turn"], r["num_prompt_tokens"]) for r in report["requests"]]
    assert [t for t, _ in turns] == [0, 1, 2, 0, 1, 2]
    # as the server counted it: each later turn's prompt holds the turns before, their answers and its message
    for (_, before), (turn, after) in itertools.pairwise(turns):
        if turn:
            assert after >= before + 8 + 40 - 2  # a few tokens may merge where the texts join
    assert report["summary"]["ttft_later_turns_s"]["p50"] > 0
    assert report["prefix_cache_hit_rate"] > 0.3  # the history of 4 of 6 requests, in full blocks


def test_a_run_is_judged_by_one_decode_slo(capsys):
    assert main(["bench", "run", "--slo-tpot-ms", "200", "--slo-tbt-ms", "300", "--num-requests", "1"]) == 2
    assert "--slo-tpot-ms (the mean gap) or --slo-tbt-ms (the p99 gap), not both" in capsys.readouterr().err
