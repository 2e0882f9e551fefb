"""pacer bench plots on synthetic runs: every function writes real PNGs, including for runs with nothing to plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacer.bench.metrics import RequestRecord, SLOTargets
from pacer.bench.plots import plot_capacity, plot_compare, plot_run
from tests.strict import import_or_skip

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SLO_BOTH = SLOTargets(ttft_s=0.2, tbt_s=0.05)


@pytest.fixture(autouse=True)
def matplotlib():
    return import_or_skip("matplotlib")  # pacer[plots]


def ok(index: int, sent_s: float, ttft_s: float, gaps_s: list[float]) -> RequestRecord:
    times = [sent_s + ttft_s]
    for gap in gaps_s:
        times.append(times[-1] + gap)
    return RequestRecord(index=index, num_prompt_tokens=32, max_tokens=len(times), scheduled_s=sent_s, sent_s=sent_s,
                         token_times_s=times, finished_s=times[-1], output_tokens=len(times))


def not_ok(index: int, sent_s: float | None, status: str, error_kind: str | None = None) -> RequestRecord:
    return RequestRecord(index=index, num_prompt_tokens=32, max_tokens=16, scheduled_s=0.5 * index, sent_s=sent_s,
                         status=status, error_kind=error_kind)


def run_records(stall_s: float = 0.3) -> list[RequestRecord]:
    """Ten completed requests (one with a stall, one with a single token, two tokens in one chunk = a 0 ms gap),
    plus a rejected one, a failed one and a failed one that was never sent."""
    records = [ok(i, 0.5 * i, 0.05 + 0.02 * i, [0.02, 0.0, 0.025] + [0.02] * i) for i in range(8)]
    records.append(ok(8, 4.0, 0.1, [0.02, stall_s, 0.02]))
    records.append(ok(9, 4.5, 0.08, []))
    records += [not_ok(10, 5.0, "rejected", "http_4xx"), not_ok(11, 5.5, "failed", "timeout"),
                not_ok(12, None, "failed")]
    return records


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, f"{path}: only {len(data)} bytes"


def test_plot_run_writes_three_pngs(tmp_path: Path) -> None:
    paths = plot_run(run_records(), SLO_BOTH, tmp_path / "run", title="synthetic run")
    assert [p.name for p in paths] == ["ttft_cdf.png", "tbt_cdf.png", "latency_over_time.png"]
    assert all(p.parent == tmp_path / "run" for p in paths)
    for path in paths:
        assert_png(path)


@pytest.mark.parametrize(("records", "slo"), [
    ([], SLOTargets()),
    ([not_ok(0, 0.0, "rejected"), not_ok(1, 0.5, "failed", "network")], SLOTargets(ttft_s=0.2)),
    ([ok(0, 0.0, 0.1, [])], SLO_BOTH),  # completed, but one token: a TTFT and no gaps
], ids=["no-requests", "none-completed", "no-gaps"])
def test_plot_run_with_nothing_to_plot(tmp_path: Path, records: list[RequestRecord], slo: SLOTargets) -> None:
    paths = plot_run(records, slo, tmp_path)
    assert len(paths) == 3
    for path in paths:
        assert_png(path)


def test_plot_run_when_latencies_span_decades(tmp_path: Path) -> None:
    """Long stalls switch the latency axes to log scale; 0 ms gaps must still plot (symlog)."""
    for path in plot_run(run_records(stall_s=5.0), SLOTargets(tbt_s=0.05, tbt_stat="mean"), tmp_path):
        assert_png(path)


def test_plot_compare_overlays_runs(tmp_path: Path) -> None:
    runs = {"fcfs": run_records(stall_s=0.5), "sarathi": run_records(stall_s=0.03), "empty": []}
    paths = plot_compare(runs, SLO_BOTH, tmp_path, title="schedulers")
    assert [p.name for p in paths] == ["compare_ttft_cdf.png", "compare_tbt_cdf.png"]
    for path in paths:
        assert_png(path)


def test_plot_compare_with_nothing_to_plot(tmp_path: Path) -> None:
    for runs in ({}, {"fcfs": [], "slo": [not_ok(0, 0.0, "rejected")]}):
        for path in plot_compare(runs, SLOTargets(), tmp_path):
            assert_png(path)


def test_plot_capacity(tmp_path: Path) -> None:
    curves = {
        "fcfs": [(4.0, 3.0, 0.75), (1.0, 1.0, 1.0), (2.0, 1.9, 0.95)],  # unsorted on purpose
        "sarathi": [(1.0, 1.0, 1.0), (2.0, 2.0, 1.0), (4.0, 3.8, 0.95)],
        "untested": [],
    }
    out = tmp_path / "nested" / "capacity.png"
    assert plot_capacity(curves, out, title="capacity") == out
    assert_png(out)


@pytest.mark.parametrize("curves", [{}, {"fcfs": []}])
def test_plot_capacity_with_no_points(tmp_path: Path, curves: dict) -> None:
    out = plot_capacity(curves, tmp_path / "capacity.png")
    assert_png(out)
