"""Markdown table of offline_throughput.py results: tokens/s per engine, and splitfuse's ratios to the others.

    python benchmarks/summarize.py splitfuse.json transformers.json vllm.json > offline.md
"""

from __future__ import annotations

import json
import sys
from typing import Any

WORKLOAD_ORDER = ("b1", "b8", "b32", "mixed")
ENGINE_ORDER = ("splitfuse", "vllm", "transformers")


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "–"


def _label(reports: dict[str, dict[str, Any]], workload: str) -> str:
    # From the run's own counts, so a shrunken smoke run is not labelled as the full workload.
    row = next(r["workloads"][workload] for r in reports.values() if workload in r["workloads"])
    return f"{workload}: {row['num_requests']} req, {row['prompt_tokens']} in / {row['output_tokens']} out tokens"


def _rate(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "–"


def table(reports: dict[str, dict[str, Any]], metric: str) -> list[str]:
    """One markdown table of ``metric`` (output_tokens_per_s or total_tokens_per_s) per workload."""
    engines = [e for e in ENGINE_ORDER if e in reports] + sorted(set(reports) - set(ENGINE_ORDER))
    others = [e for e in ("vllm", "transformers") if e in reports and "splitfuse" in reports]
    header = ["workload"] + engines + [f"splitfuse ÷ {e}" for e in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    workloads = [w for w in WORKLOAD_ORDER if any(w in r["workloads"] for r in reports.values())]
    for workload in workloads:
        rates = {e: reports[e]["workloads"].get(workload, {}).get(metric) for e in engines}
        cells = [_label(reports, workload)] + [_rate(rates[e]) for e in engines]
        cells += [_ratio(rates["splitfuse"], rates[e]) for e in others]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def versions(reports: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for engine, report in reports.items():
        version = report.get("vllm_dist") or f"{engine} {report.get('engine_version')}"
        lines.append(f"- {engine}: {version}, torch {report.get('torch_version')}")
    return lines


def main(paths: list[str]) -> None:
    reports = {}
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        reports[report["engine"]] = report
    mismatched = [(e, w) for e, r in reports.items() for w, row in r["workloads"].items() if row["length_mismatches"]]
    out = ["## Output tokens/s", ""] + table(reports, "output_tokens_per_s")
    out += ["", "## Total (prompt + output) tokens/s", ""] + table(reports, "total_tokens_per_s")
    out += ["", "## Versions", ""] + versions(reports)
    if mismatched:
        out += ["", f"**Warning:** wrong output lengths in {mismatched}"]
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
