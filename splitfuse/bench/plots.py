"""Plots: latency–throughput curves (output tokens/s against p50/p99 TTFT and TBT), one series per results file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

# The object-oriented API with an Agg canvas: no pyplot, no global backend switch,
# so plotting works headless and never disturbs another user of matplotlib.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# (metric key, statistic, panel title)
PANELS = (
    ("ttft_s", "p50", "TTFT p50"),
    ("ttft_s", "p99", "TTFT p99"),
    ("tbt_s", "p50", "TBT p50"),
    ("tbt_s", "p99", "TBT p99"),
)


def curve(report: dict[str, Any], metric: str, stat: str) -> tuple[list[float], list[float], list[str]]:
    """(output tokens/s, latency in ms, point names) of a report's points that have the latency."""
    xs, ys, names = [], [], []
    # in load order, so the line runs from light to heavy load
    for point in sorted(report["points"], key=lambda p: p.get("sweep_value") or 0.0):
        stats = point["metrics"].get(metric)
        if not stats:
            continue
        xs.append(point["metrics"]["output_tokens_per_s"])
        ys.append(stats[stat] * 1e3)
        names.append(_short_name(point))
    return xs, ys, names


def _short_name(point: dict[str, Any]) -> str:
    value = point.get("sweep_value")
    if value is None:
        return ""
    return f"c={value:g}" if point.get("sweep_parameter") == "concurrency" else f"r={value:g}"


def plot_reports(reports: Sequence[dict[str, Any]], path: str | Path,
                 labels: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Path:
    """Write a 2×2 PNG of latency against throughput, one line per report (overlaid)."""
    labels = list(labels) if labels else [report.get("label", f"run {i}") for i, report in enumerate(reports)]
    figure = Figure(figsize=(11, 8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    # fixed margins: an automatic layout engine doubles the time to draw
    figure.subplots_adjust(left=0.07, right=0.97, bottom=0.07, top=0.91, hspace=0.3, wspace=0.2)
    for axis, (metric, stat, panel_title) in zip(axes.flat, PANELS):
        drawn = False
        for report, label in zip(reports, labels):
            xs, ys, names = curve(report, metric, stat)
            if not xs:
                continue
            axis.plot(xs, ys, marker="o", label=label)
            for x, y, name in zip(xs, ys, names):
                axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            drawn = True
        axis.set_title(panel_title)
        axis.set_xlabel("output tokens/s")
        axis.set_ylabel("ms")
        axis.grid(True, alpha=0.3)
        if drawn:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "no successful requests", ha="center", va="center",
                      transform=axis.transAxes)
    figure.suptitle(title or "latency vs throughput")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
