"""Run reports: the results JSON (metrics, per-request records, command, machine, server) and the summary table."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

SCHEMA = "splitfuse.bench/1"


def machine_facts() -> dict[str, Any]:
    """Where the benchmark ran. Reads torch's version without importing torch (slow to import)."""
    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }
    for package in ("torch", "splitfuse"):
        try:
            facts[f"{package}_version"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            facts[f"{package}_version"] = None
    torch = sys.modules.get("torch")  # only if something already paid for the import
    if torch is not None and torch.cuda.is_available():
        facts["cuda_device"] = torch.cuda.get_device_name(0)
    return facts


def build_report(
    mode: str,
    label: str,
    config: dict[str, Any],
    server: Optional[dict[str, Any]],
    points: Sequence[dict[str, Any]],
    goodput: Optional[dict[str, Any]] = None,
    command: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """The whole results file. Each point is one run: its arrival settings, metrics, requests."""
    return {
        "schema": SCHEMA,
        "mode": mode,
        "label": label,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": list(command if command is not None else sys.argv),
        "machine": machine_facts(),
        "server": server,
        "config": config,
        "points": list(points),
        "goodput": goodput,
    }


def result_stem(label: str, detail: str) -> str:
    """A file-name-safe stem: 'splitfuse 0.1', 'closed-c4' -> 'splitfuse_0.1-closed-c4-20250101T120000'."""
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{label}-{detail}").strip("_")
    return f"{safe}-{stamp}"


def save_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def load_report(path: str | Path) -> dict[str, Any]:
    report = json.loads(Path(path).read_text())
    if report.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a splitfuse bench result (schema {report.get('schema')!r})")
    return report


# ---------------------------------------------------------------- summary table


def _ms(stats: Optional[dict], key: str) -> str:
    return "-" if not stats else f"{stats[key] * 1e3:.1f}"


def _number(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and one row per point; latencies in ms, throughputs per second."""
    rates = sorted({rate for point in report["points"]
                    for rate in (point["metrics"].get("effective_throughput") or {})}, key=float)
    header = ["run", "ok/total", "timeouts", "req/s", "out tok/s", "total tok/s",
              "TTFT p50", "TTFT p99", "TBT p50", "TBT p99", "TPOT mean", "E2E p50"]
    header += [f"eff r={rate} req/s" for rate in rates] + ["SLO att.", "fluidity"]
    rows = []
    for point in report["points"]:
        m = point["metrics"]
        effective = m.get("effective_throughput") or {}
        row = [
            point.get("name", "?"), f"{m['num_succeeded']}/{m['num_requests']}",
            str(m.get("num_timeouts", 0)), _number(m["requests_per_s"]),
            _number(m["output_tokens_per_s"], 1), _number(m["total_tokens_per_s"], 1),
            _ms(m.get("ttft_s"), "p50"), _ms(m.get("ttft_s"), "p99"),
            _ms(m.get("tbt_s"), "p50"), _ms(m.get("tbt_s"), "p99"),
            _ms(m.get("tpot_s"), "mean"), _ms(m.get("e2e_s"), "p50"),
        ]
        row += [_number(effective[rate]["requests_per_s"]) if rate in effective else "-" for rate in rates]
        row.append(_number((m.get("slo") or {}).get("attainment")))
        row.append(_number((m.get("fluidity") or {}).get("index")))
        rows.append(row)
    return header, rows


def print_table(report: dict[str, Any], file: Optional[TextIO] = None) -> None:
    """The summary table (rich when installed, else plain text), then goodput and errors."""
    file = file or sys.stdout
    header, rows = table_rows(report)
    title = f"{report['label']} — {report['mode']} (latencies in ms)"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        _print_plain(title, header, rows, file)
    else:
        table = Table(title=title)
        for name in header:
            table.add_column(name, justify="left" if name == "run" else "right", no_wrap=name == "run")
        for row in rows:
            table.add_row(*row)
        Console(file=file, width=max(120, sum(len(h) + 3 for h in header))).print(table)
    for point in report["points"]:
        errors = point["metrics"].get("error_counts")
        if errors:
            print(f"{point.get('name', '?')}: errors {errors}", file=file)
    if report.get("goodput"):
        print(f"goodput: {report['goodput']['goodput_requests_per_s']:.3f} requests/s", file=file)


def _print_plain(title: str, header: list[str], rows: list[list[str]], file: TextIO) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    print(title, file=file)
    for line in [header, *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)), file=file)
