"""Sweeps and goodput search: vary concurrency or rate for latency–throughput curves; find DistServe's goodput."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

from splitfuse.bench.arrivals import ArrivalConfig
from splitfuse.bench.metrics import GOODPUT_ATTAINMENT, Slo, slo_attainment
from splitfuse.bench.records import RequestRecord


def sweep_arrivals(base: ArrivalConfig, values: Sequence[float]) -> list[ArrivalConfig]:
    """One arrival config per sweep value: the concurrency of a closed loop, the rate of an open one."""
    if base.kind == "closed":
        if any(float(value) != int(value) or value < 1 for value in values):
            raise ValueError(f"closed-loop sweep values are client counts >= 1, got {list(values)}")
        return [dataclasses.replace(base, concurrency=int(value)) for value in values]
    if base.kind in ("poisson", "gamma"):
        return [dataclasses.replace(base, rate=float(value)) for value in values]
    raise ValueError("a trace replay has nothing to sweep; use --trace-time-scale per run")


def sweep_parameter_name(arrival: ArrivalConfig) -> str:
    return "concurrency" if arrival.kind == "closed" else "rate"


@dataclass
class GoodputResult:
    """The highest request rate found to meet the SLOs (0.0 if none did), and every probe."""

    rate: float
    attainment_target: float
    probes: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment)

    def to_dict(self) -> dict:
        return {
            "goodput_requests_per_s": self.rate,
            "attainment_target": self.attainment_target,
            "probes": [{"rate": rate, "attainment": attainment} for rate, attainment in self.probes],
        }


def search_goodput(
    run_at_rate: Callable[[float], list[RequestRecord]],
    slo: Slo,
    start_rate: float = 1.0,
    attainment_target: float = GOODPUT_ATTAINMENT,
    rel_tolerance: float = 0.05,
    max_probes: int = 20,
    min_rate: float = 1e-3,
    max_rate: float = 1e6,
) -> GoodputResult:
    """DistServe's goodput: the highest rate at which >= ``attainment_target`` of requests meet ``slo``.

    Assumes attainment falls as the rate grows. Exponential phase: from
    ``start_rate``, double while the rate passes (or halve while it fails) until a
    passing and a failing rate bracket the answer. Binary phase: bisect the
    bracket until it is narrower than ``rel_tolerance`` × its upper end. Returns
    the highest passing rate probed; at most ``max_probes`` runs.
    """
    result = GoodputResult(rate=0.0, attainment_target=attainment_target)

    def passes(rate: float) -> bool:
        attainment = slo_attainment(run_at_rate(rate), slo)
        result.probes.append((rate, attainment))
        return attainment >= attainment_target - 1e-12

    passing, failing = _bracket(passes, start_rate, min_rate, max_rate, max_probes, result)
    if passing is None or failing is None:
        result.rate = passing or 0.0
        return result
    while failing - passing > rel_tolerance * failing and len(result.probes) < max_probes:
        middle = (passing + failing) / 2
        if passes(middle):
            passing = middle
        else:
            failing = middle
    result.rate = passing
    return result


def _bracket(passes: Callable[[float], bool], start_rate: float, min_rate: float, max_rate: float,
             max_probes: int, result: GoodputResult) -> tuple[float | None, float | None]:
    """(highest passing rate, lowest failing rate) found by doubling or halving from start_rate."""
    rate = start_rate
    if passes(rate):
        passing, failing = rate, None
        while failing is None and rate * 2 <= max_rate and len(result.probes) < max_probes:
            rate *= 2
            if passes(rate):
                passing = rate
            else:
                failing = rate
        return passing, failing
    passing, failing = None, rate
    while passing is None and rate / 2 >= min_rate and len(result.probes) < max_probes:
        rate /= 2
        if passes(rate):
            passing = rate
        else:
            failing = rate
    return passing, failing
