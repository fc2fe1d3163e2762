"""LLMEngine: the frontend over an EngineCore — prompts in, RequestOutputs out, one core step per ``step``.

Input processing (tokenize, validate, fan out n) and output processing (detokenize, stop
strings, logprob text) happen here; scheduling and the model happen in the core, reached
through an ``EngineCoreClient`` (in this thread by default, or in another process).
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Union

from splitfuse.config import EngineConfig
from splitfuse.engine.core import EngineCore, QueueFullError
from splitfuse.engine.core_client import EngineCoreClient, InProcClient
from splitfuse.engine.input_processor import InputProcessor, PromptType, prompt_too_long_message
from splitfuse.engine.output_processor import OutputProcessor
from splitfuse.engine.protocol import SchedulerStats
from splitfuse.engine.resolved_config import ResolvedConfig, resolve_config
from splitfuse.outputs import RequestOutput, RequestOutputKind
from splitfuse.sampling_params import SamplingParams

__all__ = ["EngineStats", "LLMEngine", "PromptType", "QueueFullError", "prompt_too_long_message"]

logger = logging.getLogger(__name__)

EngineStats = SchedulerStats  # what get_stats returns: the core's numbers after its latest step


class LLMEngine:
    def __init__(self, config: EngineConfig, client: Optional[EngineCoreClient] = None,
                 resolved: Optional[ResolvedConfig] = None) -> None:
        self.config = config
        resolved = resolved or resolve_config(config)
        self.resolved = resolved
        self.tokenizer = resolved.tokenizer
        self.arch = resolved.arch
        self.max_model_len = resolved.max_model_len
        self.vocab_size = resolved.arch.vocab_size
        self.input_processor = InputProcessor(
            self.tokenizer, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
            max_num_tokens_in_cache=resolved.num_blocks * config.cache.block_size)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.client = client or InProcClient(EngineCore.from_config(config, resolved))
        self._stats: Optional[SchedulerStats] = self.client.stats()

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
                    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> None:
        """Queues a request; raises ValueError naming the problem (nothing is queued then)."""
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_token_ids, core_requests = self.input_processor.process(request_id, prompt, params,
                                                                       arrival_time, priority)
        self.client.add_requests(core_requests)
        self.output_processor.add_request(request_id, prompt if isinstance(prompt, str) else None,
                                          prompt_token_ids, params, [r.request_id for r in core_requests],
                                          core_requests[0].arrival_time, output_kind)

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
        if core_outputs.scheduler_stats is not None:
            self._stats = core_outputs.scheduler_stats
        processed = self.output_processor.process(core_outputs)
        if processed.sequences_to_abort:  # ended by a stop string: free their blocks before the next step
            self.client.abort_requests(processed.sequences_to_abort)
        return processed.request_outputs

    def get_stats(self) -> SchedulerStats:
        """The core's numbers after its latest step (an abort between steps is seen after the next one)."""
        if self.engine_core is not None:
            return self.engine_core.stats()
        return self._stats

    def shutdown(self) -> None:
        self.client.shutdown()
