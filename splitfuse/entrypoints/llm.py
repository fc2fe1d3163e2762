"""LLM: the offline, in-process API — ``generate`` over many prompts, ``chat`` over message lists."""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence, Union

from tqdm.auto import tqdm

from splitfuse.config import EngineConfig
from splitfuse.engine.llm_engine import LLMEngine, PromptType
from splitfuse.outputs import RequestOutput, RequestOutputKind
from splitfuse.sampling_params import SamplingParams

Messages = list[dict[str, Any]]


class LLM:
    """``LLM(model=path, dtype="float32", max_num_batched_tokens=256, ...)``; any EngineConfig field by name.

    With no model, the default model (SmolLM2-135M-Instruct, splitfuse.models.sources) is used.
    """

    def __init__(self, model: str = "", **engine_kwargs: Any) -> None:
        # generate() queues every prompt at once: the waiting-queue limits are for servers, unless given.
        engine_kwargs = {"max_waiting_requests": None, "max_waiting_tokens": None, **engine_kwargs}
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_kwargs))
        self._request_counter = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in prompt order.

        ``prompts`` is a string, a list of token ids, or a list of either. If any
        prompt is invalid, nothing is run and the engine is left as it was.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = self._params_per_prompt(prompts, sampling_params)
        request_ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                request_id = f"offline-{next(self._request_counter)}"
                self.engine.add_request(request_id, prompt, params, output_kind=RequestOutputKind.FINAL_ONLY)
                request_ids.append(request_id)
        except Exception:
            self.engine.abort_request(request_ids)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: Union[Messages, Sequence[Messages]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: Optional[str] = None) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to each conversation, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c, add_generation_prompt, chat_template) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True,
                            chat_template: Optional[str] = None) -> list[int]:
        if chat_template is None and not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template; pass chat_template=")
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                                      add_generation_prompt=add_generation_prompt)
        # The template already wrote any BOS it wants.
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    @staticmethod
    def _params_per_prompt(prompts: list, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in prompts]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(prompts)
        params_list = list(sampling_params)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        return params_list

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        progress = tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while len(finished) < len(request_ids) and self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        progress.update(1)
        except BaseException:
            self.engine.abort_request(request_ids)
            raise
        finally:
            progress.close()
        return [finished[r] for r in request_ids]
