"""Offline throughput: the same workloads run in-process through ``LLM.generate`` (no HTTP, no arrival process)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from splitfuse.bench.metrics import latency_stats
from splitfuse.bench.workloads import Session, flatten


@dataclass(frozen=True)
class OfflineConfig:
    """Engine settings for an offline run; None leaves the engine's own default."""

    model: str = ""  # "": the default model (splitfuse.models.sources)
    dtype: Optional[str] = None
    max_num_batched_tokens: Optional[int] = None
    max_num_seqs: Optional[int] = None

    def engine_kwargs(self) -> dict[str, Any]:
        knobs = {"dtype": self.dtype, "max_num_batched_tokens": self.max_num_batched_tokens,
                 "max_num_seqs": self.max_num_seqs}
        return {name: value for name, value in knobs.items() if value is not None}


def run_offline(config: OfflineConfig, sessions: Sequence[Session]) -> dict[str, Any]:
    """Load the model, then time one ``LLM.generate`` over every prompt; returns one report point.

    All requests go in one call, so a multi-turn workload's turns run side by side
    rather than one after another. Model loading is outside the timed region.
    """
    from splitfuse.entrypoints.llm import LLM
    from splitfuse.sampling_params import SamplingParams

    specs = flatten(sessions)
    llm = LLM(model=config.model, **config.engine_kwargs())
    prompts = [list(spec.prompt_token_ids) for spec in specs]
    params = [SamplingParams(max_tokens=spec.max_tokens, min_tokens=spec.max_tokens,
                             ignore_eos=True, temperature=0.0) for spec in specs]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    duration_s = time.perf_counter() - start
    requests = [_request_row(spec, output) for spec, output in zip(specs, outputs)]
    return {
        "name": "offline",
        "sweep_parameter": None,
        "sweep_value": None,
        "metrics": summarize_offline(requests, duration_s),
        "requests": requests,
    }


def _request_row(spec: Any, output: Any) -> dict[str, Any]:
    metrics = output.metrics
    num_output = len(output.outputs[0].token_ids)
    first, finished = metrics.first_token_time, metrics.finished_time
    tpot = None
    if first is not None and finished is not None and num_output > 1:
        tpot = (finished - first) / (num_output - 1)
    return {
        "request_id": spec.request_id,
        "prompt_tokens": spec.num_prompt_tokens,
        "requested_output_tokens": spec.max_tokens,
        "output_tokens": num_output,
        "ttft_s": None if first is None else first - metrics.arrival_time,
        "e2e_s": None if finished is None else finished - metrics.arrival_time,
        "tpot_s": tpot,
    }


def summarize_offline(requests: Sequence[dict[str, Any]], duration_s: float) -> dict[str, Any]:
    """Throughput over the ``generate`` call, plus TTFT/TPOT/E2E from the engine's timestamps.

    No TBT: the offline API does not report when each token was made.
    """
    prompt_tokens = sum(row["prompt_tokens"] for row in requests)
    output_tokens = sum(row["output_tokens"] for row in requests)
    per_s = (lambda count: count / duration_s) if duration_s > 0 else (lambda count: 0.0)
    return {
        "num_requests": len(requests),
        "num_succeeded": len(requests),
        "num_errors": 0,
        "num_timeouts": 0,
        "num_length_mismatches": sum(row["output_tokens"] != row["requested_output_tokens"]
                                     for row in requests),
        "duration_s": duration_s,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "requests_per_s": per_s(len(requests)),
        "output_tokens_per_s": per_s(output_tokens),
        "total_tokens_per_s": per_s(prompt_tokens + output_tokens),
        "ttft_s": latency_stats(row["ttft_s"] for row in requests if row["ttft_s"] is not None),
        "tbt_s": None,
        "tpot_s": latency_stats(row["tpot_s"] for row in requests if row["tpot_s"] is not None),
        "e2e_s": latency_stats(row["e2e_s"] for row in requests if row["e2e_s"] is not None),
    }
