"""One `bench serve` invocation: build the workload, run each sweep point and the goodput search, save JSON and PNG."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

from splitfuse.bench.arrivals import ArrivalConfig, TraceEntry
from splitfuse.bench.client import ServerTarget, fetch_server_version, run_load
from splitfuse.bench.metrics import Slo, summarize
from splitfuse.bench.records import RequestRecord
from splitfuse.bench.report import build_report, print_table, result_stem, save_report
from splitfuse.bench.sweep import search_goodput, sweep_arrivals, sweep_parameter_name
from splitfuse.bench.workloads import Session, WorkloadConfig


@dataclass
class ServeRun:
    """Everything one `bench serve` needs (built and checked by ``cli.serve_run_from_args``); ``execute`` runs it."""

    target: ServerTarget
    workload: WorkloadConfig
    arrival: ArrivalConfig
    sessions: list[Session]
    trace: Optional[list[TraceEntry]]
    sweep_values: Optional[list[float]]
    max_duration_s: float
    slo: Optional[Slo]
    fluidity_deadlines_s: Optional[tuple[float, float]]
    effective_rates: list[float]
    goodput: bool
    goodput_start_rate: float
    goodput_max_probes: int
    output_dir: Path
    label: Optional[str]
    plot: bool
    show_progress: bool
    prompt_format: str
    tokenizer: Optional[str]

    def run_records(self, arrival: ArrivalConfig) -> tuple[list[RequestRecord], float, str]:
        result = run_load(self.target, self.sessions, arrival, self.max_duration_s,
                          seed=self.workload.seed, trace=self.trace, show_progress=self.show_progress)
        return result.records, result.duration_s, result.started_at

    def summarize(self, records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
        return summarize(records, duration_s, self.effective_rates, self.slo, self.fluidity_deadlines_s)

    def run_point(self, arrival: ArrivalConfig) -> dict[str, Any]:
        """Run the workload once with ``arrival``; the report point with metrics and records."""
        records, duration_s, started_at = self.run_records(arrival)
        parameter = None if arrival.kind == "trace" else sweep_parameter_name(arrival)
        value = {"concurrency": arrival.concurrency, "rate": arrival.rate}.get(parameter)
        return {
            "name": arrival.describe(),
            "arrival": dataclasses.asdict(arrival),
            "sweep_parameter": parameter,
            "sweep_value": value,
            "started_at": started_at,
            "metrics": self.summarize(records, duration_s),
            "requests": [record.to_dict() for record in records],
        }

    def search_goodput(self) -> dict[str, Any]:
        """DistServe goodput over the open-loop rate; each probe's metrics are kept."""
        kind = "poisson" if self.arrival.kind == "closed" else self.arrival.kind
        runs: list[dict[str, Any]] = []

        def run_at_rate(rate: float) -> list[RequestRecord]:
            arrival = dataclasses.replace(self.arrival, kind=kind, rate=rate)
            records, duration_s, _ = self.run_records(arrival)
            runs.append({"name": arrival.describe(), "rate": rate,
                         "metrics": self.summarize(records, duration_s)})
            return records

        result = search_goodput(run_at_rate, self.slo, start_rate=self.goodput_start_rate,
                                max_probes=self.goodput_max_probes)
        return {**result.to_dict(), "arrival": kind, "runs": runs}

    def config_dict(self) -> dict[str, Any]:
        return {
            "target": dataclasses.asdict(self.target),
            "workload": self.workload.to_dict(),
            "arrival": dataclasses.asdict(self.arrival),
            "sweep": self.sweep_values,
            "max_duration_s": self.max_duration_s,
            "prompt_format": self.prompt_format,
            "tokenizer": self.tokenizer,
            "slo": dataclasses.asdict(self.slo) if self.slo else None,
            "fluidity_deadlines_s": self.fluidity_deadlines_s,
            "effective_rates": self.effective_rates,
        }

    def execute(self, command: Sequence[str]) -> int:
        """Run, save ``<stem>.json`` (+ ``<stem>.png``), print the table; 0 if any request succeeded."""
        version = fetch_server_version(self.target)
        label = self.label or _default_label(self.target, version)
        arrivals = sweep_arrivals(self.arrival, self.sweep_values) if self.sweep_values else [self.arrival]
        points = [self.run_point(arrival) for arrival in arrivals]
        goodput = self.search_goodput() if self.goodput else None
        server = {"base_url": self.target.base_url, "model": self.target.model,
                  "endpoint": self.target.endpoint, "version": version}
        report = build_report("serve", label, self.config_dict(), server, points, goodput, command)
        detail = "sweep-" + self.arrival.kind if self.sweep_values else self.arrival.describe()
        stem = result_stem(label, detail)
        json_path = save_report(report, self.output_dir / f"{stem}.json")
        print_table(report)
        print(f"results: {json_path}")
        if self.plot:
            from splitfuse.bench.plots import plot_reports

            print(f"plot: {plot_reports([report], self.output_dir / f'{stem}.png', title=f'{label}: {detail}')}")
        succeeded = sum(point["metrics"]["num_succeeded"] for point in points)
        return 0 if succeeded > 0 else 1


def _default_label(target: ServerTarget, version: Optional[str]) -> str:
    host = urlparse(target.root_url).netloc or target.root_url
    return f"{host} v{version}" if version else host
