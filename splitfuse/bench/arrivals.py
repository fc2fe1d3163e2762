"""Arrival processes: when requests are sent — closed loop, Poisson, bursty gamma, or a replayed trace."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ARRIVAL_KINDS = ("closed", "poisson", "gamma", "trace")


@dataclass(frozen=True)
class ArrivalConfig:
    """How requests arrive.

    closed:  ``concurrency`` clients, each sends its next request when its previous
             one ends (DeepSpeed-FastGen's method); no schedule.
    poisson: open loop, exponential inter-arrival times with mean 1 / ``rate``.
    gamma:   open loop, gamma inter-arrival times with mean 1 / ``rate`` and
             coefficient of variation ``cv`` (cv > 1 is bursty, as BurstGPT saw in
             real traffic; cv = 1 is Poisson).
    trace:   open loop, the timestamps of ``trace_path`` (gaps × ``trace_time_scale``).
    """

    kind: str = "closed"
    concurrency: int = 1
    rate: float = 1.0
    cv: float = 2.0
    trace_path: Optional[str] = None
    trace_time_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ARRIVAL_KINDS:
            raise ValueError(f"arrival kind must be one of {ARRIVAL_KINDS}, got {self.kind!r}")
        if self.kind == "closed" and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.kind in ("poisson", "gamma") and self.rate <= 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.kind == "gamma" and self.cv <= 0:
            raise ValueError(f"cv must be > 0, got {self.cv}")
        if self.kind == "trace" and not self.trace_path:
            raise ValueError("arrival kind 'trace' needs trace_path")

    @property
    def is_open_loop(self) -> bool:
        return self.kind != "closed"

    def describe(self) -> str:
        """Short label: 'closed-c8', 'poisson-r2', 'gamma-r2-cv3', 'trace'."""
        if self.kind == "closed":
            return f"closed-c{self.concurrency}"
        if self.kind == "poisson":
            return f"poisson-r{self.rate:g}"
        if self.kind == "gamma":
            return f"gamma-r{self.rate:g}-cv{self.cv:g}"
        return "trace"


def poisson_intervals(rate: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` exponential inter-arrival times (s) of a Poisson process at ``rate``/s."""
    return rng.exponential(scale=1.0 / rate, size=count)


def gamma_intervals(rate: float, cv: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` gamma inter-arrival times (s) with mean 1/rate and coefficient of variation cv.

    Gamma(shape k, scale θ) has mean kθ and CV 1/√k, so k = 1/cv² and θ = 1/(rate·k).
    """
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape=shape, scale=1.0 / (rate * shape), size=count)


def send_offsets(
    config: ArrivalConfig,
    count: int,
    rng: np.random.Generator,
    trace: Optional[Sequence["TraceEntry"]] = None,
) -> np.ndarray:
    """Send times (s after the start) of ``count`` open-loop arrivals; the first is at 0.

    intervals [0.5, 0.2, 0.3] -> offsets [0.0, 0.5, 0.7]
    """
    if config.kind == "poisson":
        intervals = poisson_intervals(config.rate, count, rng)
    elif config.kind == "gamma":
        intervals = gamma_intervals(config.rate, config.cv, count, rng)
    elif config.kind == "trace":
        if trace is None:
            raise ValueError("trace arrivals need the loaded trace entries")
        stamps = np.array([entry.timestamp_s for entry in trace[:count]], dtype=np.float64)
        return (stamps - stamps[0]) * config.trace_time_scale if stamps.size else stamps
    else:
        raise ValueError("a closed loop has no send schedule")
    return np.concatenate([[0.0], np.cumsum(intervals[:-1])]) if count else np.zeros(0)


# ---------------------------------------------------------------- trace files


@dataclass(frozen=True)
class TraceEntry:
    """One row of a request trace: when it came, how long its prompt and answer were."""

    timestamp_s: float
    prompt_tokens: int
    output_tokens: int


# Column names we accept, compared after lower-casing and mapping ' ' and '-' to '_'.
# BurstGPT's own columns come first: Timestamp, Request tokens, Response tokens.
_TIMESTAMP_COLUMNS = ("timestamp", "time", "arrival_time", "timestamp_s")
_PROMPT_COLUMNS = ("request_tokens", "prompt_tokens", "input_tokens", "input_length", "prompt_len")
_OUTPUT_COLUMNS = ("response_tokens", "output_tokens", "output_length", "output_len")


def load_trace(path: str | Path) -> list[TraceEntry]:
    """Entries of a CSV or JSONL trace (BurstGPT's columns or the aliases above), sorted by time.

    Rows with zero output tokens (failed requests in BurstGPT) or zero prompt
    tokens are skipped: they cannot be replayed as a streaming request.
    """
    path = Path(path)
    with path.open(newline="") as handle:
        if path.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in handle if line.strip()]
        else:
            rows = list(csv.DictReader(handle))
    entries = [_trace_entry(row, path) for row in rows]
    kept = [entry for entry in entries if entry.prompt_tokens > 0 and entry.output_tokens > 0]
    return sorted(kept, key=lambda entry: entry.timestamp_s)


def _trace_entry(row: dict, path: Path) -> TraceEntry:
    normalized = {str(key).strip().lower().replace(" ", "_").replace("-", "_"): value
                  for key, value in row.items()}

    def pick(names: tuple[str, ...]) -> str:
        for name in names:
            if name in normalized and normalized[name] not in (None, ""):
                return normalized[name]
        raise ValueError(f"{path}: row {row} has none of the columns {names}")

    return TraceEntry(
        timestamp_s=float(pick(_TIMESTAMP_COLUMNS)),
        prompt_tokens=int(float(pick(_PROMPT_COLUMNS))),
        output_tokens=int(float(pick(_OUTPUT_COLUMNS))),
    )
