"""PNG plots of `pacer bench` runs for reports and the README: latency CDFs, latency over time, capacity curves.

Latencies are drawn in ms (the edge unit, METRICS.md names); inputs stay in seconds like the rest of pacer.
matplotlib is optional (`pacer[plots]`): imported at the first figure, so that bench and sim run without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pacer.bench.metrics import RequestRecord, SLOTargets, request_metrics
from pacer.extras import require

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ATTAINMENT_BAR = 0.9  # DistServe's goodput is the highest rate with >= 90 % of requests within SLO
NOT_OK_STYLE = {"rejected": ("x", "tab:red"), "failed": ("X", "black")}
LOG_SPREAD = 10  # max / median above which a latency axis goes logarithmic, so stalls do not squash the body


def require_matplotlib() -> None:
    """Fail with the extra to install, before a run rather than after it, when plots are asked for."""
    require("matplotlib", "plots", "plots (--plots)")


def plot_run(records: list[RequestRecord], slo: SLOTargets, out_dir: Path, title: str = "") -> list[Path]:
    """One run: ttft_cdf.png, tbt_cdf.png and latency_over_time.png in out_dir; returns the paths written."""
    run = {"": records}
    return [
        _plot_cdfs(run, "ttft", slo, out_dir / "ttft_cdf.png", title),
        _plot_cdfs(run, "tbt", slo, out_dir / "tbt_cdf.png", title),
        _plot_over_time(records, slo, out_dir / "latency_over_time.png", title),
    ]


def plot_compare(runs: dict[str, list[RequestRecord]], slo: SLOTargets, out_dir: Path, title: str = "") -> list[Path]:
    """Several runs of one workload (e.g. one per scheduler) overlaid: compare_ttft_cdf.png, compare_tbt_cdf.png."""
    return [
        _plot_cdfs(runs, "ttft", slo, out_dir / "compare_ttft_cdf.png", title),
        _plot_cdfs(runs, "tbt", slo, out_dir / "compare_tbt_cdf.png", title),
    ]


def plot_capacity(curves: dict[str, list[tuple[float, float, float]]], out_path: Path, title: str = "") -> Path:
    """Goodput and SLO attainment against offered rate, one line per label.

    curves: label -> [(offered rate req/s, goodput req/s, SLO attainment 0..1), ...]. The y=x line shows where
    every offered request is served within SLO; the 0.9 line is DistServe's bar, so a curve's capacity is where it
    crosses it.
    """
    fig = _figure(12, 4.8)
    goodput_ax, attain_ax = fig.subplots(1, 2)
    points = {label: sorted(curve) for label, curve in curves.items() if curve}
    rates = [rate for curve in points.values() for rate, _, _ in curve]
    if not rates:
        for ax in (goodput_ax, attain_ax):
            _say_empty(ax, "no capacity points")
    else:
        top = max(rates) * 1.05
        goodput_ax.plot([0, top], [0, top], ls=":", color="grey", label="all served in SLO (y = x)")
        attain_ax.axhline(ATTAINMENT_BAR * 100, ls="--", color="tab:red", label=f"{ATTAINMENT_BAR:.0%} (DistServe's bar)")
        for label, curve in points.items():
            rate, goodput, attainment = (np.asarray(column, dtype=float) for column in zip(*curve))
            goodput_ax.plot(rate, goodput, marker="o", label=label)
            attain_ax.plot(rate, attainment * 100, marker="o", label=label)
        attain_ax.set_ylim(-3, 103)
    _decorate(goodput_ax, "goodput vs offered rate", "offered rate (req/s)", "goodput (req/s)")
    _decorate(attain_ax, "SLO attainment vs offered rate", "offered rate (req/s)", "SLO attainment (%)")
    return _save(fig, out_path, title)


def _plot_cdfs(runs: dict[str, list[RequestRecord]], metric: str, slo: SLOTargets, path: Path, title: str) -> Path:
    """CDF of TTFT (one value per completed request) or TBT (every gap of every completed request, pooled,
    since P99 TBT is over all tokens: METRICS.md), one line per run."""
    fig = _figure(7, 4.8)
    ax = fig.subplots()
    every_ms = []
    for label, records in runs.items():
        values_ms = np.sort(_latencies_s(records, metric)) * 1e3
        if values_ms.size == 0:
            continue
        every_ms.append(values_ms)
        fractions = np.arange(1, values_ms.size + 1) / values_ms.size
        p50, p99 = np.percentile(values_ms, [50, 99])
        stats = f"n={values_ms.size}, p50 {p50:.0f} ms, p99 {p99:.0f} ms"
        ax.step(values_ms, fractions, where="post", label=f"{label}: {stats}" if label else stats)
    if every_ms:
        _latency_scale(ax, "x", np.concatenate(every_ms))
        ax.axhline(0.99, ls=":", color="grey", label="p99")  # where a curve crosses it is its P99
    else:
        _say_empty(ax, "no completed requests" if metric == "ttft" else "no token gaps\n(no completed request "
                   "with 2+ tokens)")
    slo_s = slo.ttft_s if metric == "ttft" else slo.tbt_s
    if slo_s is not None:
        on = "" if metric == "ttft" else f" (on each request's {slo.tbt_stat} gap)"
        ax.axvline(slo_s * 1e3, ls="--", color="tab:red", label=f"SLO {slo_s * 1e3:g} ms{on}")
    name, unit = ("TTFT", "requests") if metric == "ttft" else ("TBT", "token gaps")
    ax.set_ylim(0, 1.02)
    _decorate(ax, f"{name} CDF", f"{name} (ms)", f"fraction of {unit} ≤ x")
    return _save(fig, path, title)


def _plot_over_time(records: list[RequestRecord], slo: SLOTargets, path: Path, title: str) -> Path:
    """TTFT and max TBT of each request against its send time, so queue build-up and stalls show where they
    happened; rejected and failed requests are marked along the bottom at their send time."""
    fig = _figure(10, 4.8)
    ax = fig.subplots()
    sent, ttft, max_tbt = [], [], []
    for record in records:
        if record.status == "ok" and record.sent_s is not None:
            metrics = request_metrics(record)
            sent.append(record.sent_s)
            ttft.append(np.nan if metrics.ttft_s is None else metrics.ttft_s * 1e3)
            max_tbt.append(np.nan if metrics.max_tbt_s is None else metrics.max_tbt_s * 1e3)
    if sent:
        ax.scatter(sent, ttft, s=14, color="tab:blue", label="TTFT")
        ax.scatter(sent, max_tbt, s=14, marker="^", color="tab:orange", label="max TBT of the request")
        ax.set_ymargin(0.1)  # room along the bottom for the rejected / failed marks
        _latency_scale(ax, "y", np.array(ttft + max_tbt))
    else:
        _say_empty(ax, "no completed requests")
        ax.set_ylim(0, 1)
        ax.tick_params(labelleft=False)  # no latencies, so no latency scale to read
    for value_s, name, color in ((slo.ttft_s, "TTFT", "tab:blue"), (slo.tbt_s, "TBT", "tab:orange")):
        if value_s is not None:
            ax.axhline(value_s * 1e3, ls="--", color=color, label=f"{name} SLO {value_s * 1e3:g} ms")
    _mark_not_ok(ax, records)
    _decorate(ax, "latency per request over the run", "send time (s)", "latency (ms)")
    if ax.get_legend():  # outside, so it never hides points
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return _save(fig, path, title)


def _latency_scale(ax: Axes, which: str, values_ms: np.ndarray) -> None:
    """Logarithmic (symlog if some are 0 ms, e.g. tokens that arrived in one chunk) when the values spread over
    more than a decade, with ticks in plain ms numbers rather than powers of ten."""
    from matplotlib import ticker

    values_ms = values_ms[np.isfinite(values_ms)]
    median = float(np.median(values_ms)) if values_ms.size else 0.0
    if median <= 0 or values_ms.max() <= LOG_SPREAD * median:
        return
    set_scale, axis = (ax.set_xscale, ax.xaxis) if which == "x" else (ax.set_yscale, ax.yaxis)
    low = values_ms.min() if values_ms.min() > 0 else 1.0
    subs = (1, 2, 5) if values_ms.max() / low <= 300 else (1,)  # 1-2-5 labels collide beyond ~2.5 decades
    if values_ms.min() > 0:
        set_scale("log")
        axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    else:
        set_scale("symlog", linthresh=1.0)  # linear below 1 ms
        axis.set_major_locator(ticker.SymmetricalLogLocator(base=10, linthresh=1.0, subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _mark_not_ok(ax: Axes, records: list[RequestRecord]) -> None:
    """Rejected and failed requests have no latency, so they sit just above the x axis (axes coordinates), at
    their send time, or their scheduled time if they were never sent."""
    for status, (marker, color) in NOT_OK_STYLE.items():
        times = [_send_time(r) for r in records if r.status == status and _send_time(r) is not None]
        if times:
            ax.scatter(times, [0.03] * len(times), marker=marker, color=color, s=30,
                       transform=ax.get_xaxis_transform(), label=f"{status} ({len(times)})")
            ax.update_datalim([(t, 1.0) for t in times], updatey=False)  # blended artists do not widen x
    ax.autoscale_view(scaley=False)


def _send_time(record: RequestRecord) -> float | None:
    return record.sent_s if record.sent_s is not None else record.scheduled_s


def _latencies_s(records: list[RequestRecord], metric: str) -> list[float]:
    """TTFT per completed request, or every TBT gap of every completed request."""
    metrics = [request_metrics(r) for r in records if r.status == "ok"]
    if metric == "ttft":
        return [m.ttft_s for m in metrics if m.ttft_s is not None]
    return [gap for m in metrics for gap in m.tbt_s]


def _say_empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=13, color="grey")


def _decorate(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.4)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def _figure(width: float, height: float) -> Figure:
    """A Figure drawn by Agg without pyplot: no window, no global backend switch for whoever imports us (a
    notebook keeps its own), and no pyplot registry holding every figure alive until closed."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title, fontweight="bold")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
