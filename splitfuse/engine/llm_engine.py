"""LLMEngine: the frontend over an EngineCore — prompts in, RequestOutputs out, one core step per ``step``.

Input processing (tokenize, validate, fan out n) and output processing (detokenize, stop
strings, logprob text) happen here; scheduling and the model happen in the core, reached
through an ``EngineCoreClient`` (in this thread by default, or in another process).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from splitfuse.clock import Clock
from splitfuse.config import EngineConfig
from splitfuse.engine.core import EngineCore, QueueFullError
from splitfuse.engine.core_client import EngineCoreClient, InProcClient, MPClient
from splitfuse.engine.input_processor import InputProcessor, PromptType, prompt_too_long_message
from splitfuse.engine.output_processor import OutputProcessor
from splitfuse.engine.protocol import EngineCoreRequest, SchedulerStats
from splitfuse.engine.resolved_config import ResolvedConfig, resolve_config
from splitfuse.outputs import RequestOutput, RequestOutputKind
from splitfuse.sampling_params import SamplingParams

__all__ = ["EngineStats", "LLMEngine", "NewRequest", "PromptType", "QueueFullError", "prompt_too_long_message"]

logger = logging.getLogger(__name__)

EngineStats = SchedulerStats  # what get_stats returns: the core's numbers after its latest step


@dataclass
class NewRequest:
    """One request to add (``LLMEngine.add_requests``)."""

    request_id: str
    prompt: PromptType
    params: SamplingParams
    arrival_time: Optional[float] = None
    priority: int = 0
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    tenant: Optional[str] = None  # who sent it; session routing keeps a tenant on one replica


class LLMEngine:
    def __init__(self, config: EngineConfig, client: Optional[EngineCoreClient] = None,
                 resolved: Optional[ResolvedConfig] = None, clock: Optional[Clock] = None) -> None:
        """``clock`` stamps arrival times (the wall clock by default; a virtual one beside a virtual core)."""
        self.config = config
        resolved = resolved or resolve_config(config)
        self.resolved = resolved
        self.tokenizer = resolved.tokenizer
        self.arch = resolved.arch
        self.max_model_len = resolved.max_model_len
        self.vocab_size = resolved.arch.vocab_size
        # None on CUDA: the runner sizes the pool after profiling, and the core checks requests against it.
        cache_tokens = None if resolved.num_blocks is None else resolved.num_blocks * config.cache.block_size
        self.input_processor = InputProcessor(
            self.tokenizer, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
            max_num_tokens_in_cache=cache_tokens, clock=clock)
        self.output_processor = OutputProcessor(self.tokenizer)
        if client is None and config.parallel.replicas > 1:
            from splitfuse.engine.replica_client import ReplicatedClient

            client = ReplicatedClient(config)
        elif client is None and config.parallel.distributed_backend == "ray":
            from splitfuse.engine.ray_client import RayClient

            client = RayClient(config)
        elif client is None and config.parallel.core_process:
            client = MPClient(config)  # the child resolves the config again: the same files give the same numbers
        self.client = client or InProcClient(EngineCore.from_config(config, resolved))

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        return cls(config)

    @property
    def engine_core(self) -> Optional[EngineCore]:
        """The core itself when it runs in this thread (tests and tools look inside it), else None."""
        return getattr(self.client, "engine_core", None)

    # -- admission ------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: Optional[float] = None, priority: int = 0,
                    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE, tenant: Optional[str] = None) -> None:
        """Queues a request; raises ValueError naming the problem (nothing is queued then)."""
        (error,) = self.add_requests([NewRequest(request_id, prompt, params, arrival_time, priority, output_kind,
                                                 tenant)])
        if error is not None:
            raise error

    def add_requests(self, requests: list[NewRequest]) -> list[Optional[Exception]]:
        """Queues several requests in one exchange with the core; per request, None or why it was refused."""
        results: list[Optional[Exception]] = [None] * len(requests)
        accepted: list[tuple[int, list[int], list[EngineCoreRequest]]] = []
        ids_in_batch: set[str] = set()
        for index, new in enumerate(requests):
            try:
                if self.output_processor.has_request(new.request_id) or new.request_id in ids_in_batch:
                    raise ValueError(f"request id {new.request_id!r} is already in use")
                prompt_token_ids, core_requests = self.input_processor.process(
                    new.request_id, new.prompt, new.params, new.arrival_time, new.priority, new.tenant)
            except (ValueError, TypeError) as error:
                results[index] = error
                continue
            ids_in_batch.add(new.request_id)
            accepted.append((index, prompt_token_ids, core_requests))
        refusals = self.client.add_request_groups([core_requests for _, _, core_requests in accepted])
        for (index, prompt_token_ids, core_requests), refusal in zip(accepted, refusals):
            if refusal is not None:
                results[index] = refusal
                continue
            new = requests[index]
            self.output_processor.add_request(new.request_id, new.prompt if isinstance(new.prompt, str) else None,
                                              prompt_token_ids, new.params, [r.request_id for r in core_requests],
                                              core_requests[0].arrival_time, new.output_kind)
        return results

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        """Stops requests at once and frees their KV blocks; unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        sequence_ids = [s for request_id in request_ids for s in self.output_processor.remove_request(request_id)]
        if sequence_ids:
            self.client.abort_requests(sequence_ids)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    # -- one step ---------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One core step; returns outputs of requests that changed (per their output kind)."""
        core_outputs = self.client.get_output()
        processed = self.output_processor.process(core_outputs)
        if processed.sequences_to_abort:  # ended by a stop string: free their blocks before the next step
            self.client.abort_requests(processed.sequences_to_abort)
        return processed.request_outputs

    def get_stats(self) -> SchedulerStats:
        """The core's numbers after its latest step (an abort between steps is seen after the next one)."""
        return self.client.stats()

    def shutdown(self) -> None:
        self.client.shutdown()
