"""What completions and chat share: SamplingParams, per-request limits, engine requests, deltas, SSE, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, Optional, TypeVar

from fastapi import Request
from pydantic import BaseModel

from splitfuse.engine.async_engine import AsyncLLMEngine, QueueFullError, RequestStream
from splitfuse.engine.llm_engine import prompt_too_long_message
from splitfuse.entrypoints.openai.errors import OpenAIError, error_body, from_engine_error
from splitfuse.entrypoints.openai.prompt_workers import PromptWorkers
from splitfuse.entrypoints.openai.protocol import BaseSamplingRequest, UsageInfo
from splitfuse.entrypoints.openai.server_config import ServerConfig
from splitfuse.outputs import CompletionOutput, Logprob, RequestOutput
from splitfuse.sample.grammar import check as check_grammar
from splitfuse.sampling_params import SamplingParams, StructuredOutputsParams

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
_PARAM_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams)) | frozenset(
    {"prompt", "messages", "model", "max_completion_tokens", "top_logprobs"})


def structured_outputs(request: BaseSamplingRequest) -> Optional[StructuredOutputsParams]:
    """The request's one output constraint, checked (compiled without a tokenizer); None if it has none.

    A 400 names the field: more than one constraint, or a schema, regex or grammar that does not compile.
    """
    given: list[tuple[str, dict[str, Any]]] = []
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_object":
        given.append(("response_format", {"json_object": True}))
    elif response_format is not None and response_format.type == "json_schema":
        schema = response_format.json_schema.json_schema if response_format.json_schema else None
        if schema is None:
            raise OpenAIError("response_format of type json_schema needs json_schema.schema",
                              param="response_format")
        given.append(("response_format", {"json": schema}))
    if request.structured_outputs is not None:
        fields = request.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        given.append(("structured_outputs", {k: v for k, v in fields.items() if v is not False}))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        if getattr(request, name) is not None:
            given.append((name, {key: getattr(request, name)}))
    if not given:
        return None
    if len(given) > 1:
        raise OpenAIError(f"give one output constraint, not {' and '.join(name for name, _ in given)}",
                          param=given[1][0])
    param, fields = given[0]
    try:
        spec = StructuredOutputsParams(**fields)
        check_grammar(spec)
    except ValueError as error:
        raise OpenAIError(str(error), param=param) from None
    return spec


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was ready."""


def sse(chunk: BaseModel | dict[str, Any]) -> str:
    """One server-sent event: ``data: {...}`` and a blank line."""
    payload = chunk.model_dump_json() if isinstance(chunk, BaseModel) else _json(chunk)
    return f"data: {payload}\n\n"


def sse_error(error: BaseException) -> str:
    """An error after the stream started (status 200 already sent): reported as one event."""
    api_error = from_engine_error(error, _PARAM_NAMES)
    return f"data: {_json(error_body(api_error.message, api_error.status, code=api_error.code))}\n\n"


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def usage_of(outputs: Sequence[RequestOutput]) -> UsageInfo:
    """Prompt tokens count once per prompt; completion tokens once per generated token of every choice,
    and of every best_of sequence not returned (as OpenAI bills best_of)."""
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    completion_tokens += sum(o.metrics.num_discarded_tokens for o in outputs)
    return usage_info(prompt_tokens, completion_tokens)


def usage_info(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    """A usage object; stream chunks under ``continuous_usage_stats`` carry one with the totals so far."""
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


class OpenAIServing:
    """Base of the completion and chat handlers: the engine handle, the model names, the limits, the workers."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], metrics: Any = None, *,
                 config: ServerConfig, workers: PromptWorkers) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.metrics = metrics
        self.config = config
        self.workers = workers

    def check_prompt_chars(self, num_chars: int, what: str, param: str) -> None:
        """400 for text longer than any prompt that fits the context (see PromptWorkers.max_prompt_chars)."""
        limit = self.workers.max_prompt_chars
        if limit is not None and num_chars > limit:
            raise self.too_many_chars(what, param)

    def too_many_chars(self, what: str, param: str) -> OpenAIError:
        return OpenAIError(f"{what}, but no prompt of more than {self.workers.max_prompt_chars} characters fits "
                           f"the model's context length (max_model_len) of {self.engine.max_model_len} tokens "
                           f"(a token stands for {self.workers.chars_per_token} characters at most)",
                           param=param, code="prompt_too_long")

    def check_prompt_tokens(self, num_tokens: int) -> None:
        if num_tokens >= self.engine.max_model_len:  # the engine says the same; here it costs no engine time
            raise OpenAIError(prompt_too_long_message(num_tokens, self.engine.max_model_len), param="prompt")

    def check_model(self, requested: Optional[str]) -> str:
        """The name to report; an unknown name is a 400 (an omitted one means the default model)."""
        if requested is None or requested in self.served_model_names:
            return requested or self.served_model_names[0]
        raise OpenAIError(f"the model '{requested}' does not exist; this server serves "
                          f"{', '.join(repr(n) for n in self.served_model_names)}",
                          400, param="model", code="model_not_found")

    def sampling_params(self, request: BaseSamplingRequest, *, max_tokens: Optional[int], num_prompts: int = 1,
                        logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None,
                        best_of: Optional[int] = None) -> SamplingParams:
        """SamplingParams from the request fields; a bad value is a 400 naming the field."""
        self._check_num_choices(request.n, num_prompts, best_of)
        logit_bias = None
        if request.logit_bias:
            try:
                logit_bias = {int(token): bias for token, bias in request.logit_bias.items()}
            except ValueError:
                raise OpenAIError("logit_bias keys must be token ids (integers as strings)",
                                  param="logit_bias") from None
        if request.stream_options is not None and not request.stream:
            raise OpenAIError("stream_options is only allowed when stream is true", param="stream_options")
        constraint = structured_outputs(request)
        top_k = request.top_k or 0
        if top_k > self.engine.vocab_size:  # same meaning, and the sampler never asks for more than exist
            top_k = 0
        try:
            params = SamplingParams(
                n=request.n, best_of=best_of, max_tokens=max_tokens, min_tokens=request.min_tokens,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p, top_k=top_k,
                min_p=request.min_p or 0.0,
                repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
                presence_penalty=request.presence_penalty or 0.0,
                frequency_penalty=request.frequency_penalty or 0.0,
                logit_bias=logit_bias, seed=request.seed, stop=request.stop,
                stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                skip_special_tokens=request.skip_special_tokens,
                include_stop_str_in_output=request.include_stop_str_in_output,
                structured_outputs=constraint)
        except (ValueError, TypeError) as error:
            raise from_engine_error(error, _PARAM_NAMES) from None
        vocab_size = self.engine.vocab_size
        try:
            params.validate_for_vocab(vocab_size)
        except ValueError as error:
            bad_stop = any(not 0 <= t < vocab_size for t in params.stop_token_ids or [])
            raise OpenAIError(str(error), param="stop_token_ids" if bad_stop else "logit_bias") from None
        return params

    def _check_num_choices(self, n: int, num_prompts: int, best_of: Optional[int] = None) -> None:
        # Each choice (each best_of sequence, returned or not) is a sequence in the batch: without a cap
        # one request could take all of it.
        max_prompts, max_choices = self.config.max_prompts_per_request, self.config.max_choices_per_request
        if num_prompts > max_prompts:
            raise OpenAIError(f"prompt holds {num_prompts} prompts; at most {max_prompts} are allowed per request",
                              param="prompt")
        if not 1 <= n <= max_choices:
            raise OpenAIError(f"n must be between 1 and {max_choices}, got {n}", param="n")
        if best_of is not None and not n <= best_of <= max_choices:
            raise OpenAIError(f"best_of must be between n ({n}) and {max_choices}, got {best_of}", param="best_of")
        name, num_sequences = ("n", n) if best_of is None else ("best_of", best_of)
        if num_sequences * num_prompts > max_choices:
            raise OpenAIError(f"{name} x prompts = {num_sequences} x {num_prompts} = {num_sequences * num_prompts} "
                              f"choices; at most {max_choices} are allowed per request", param=name)

    def _check_fits_waiting_queue(self, prompts: Sequence[str | list[int]], n: int) -> None:
        """400 for a request the waiting queue could never take whole (a 429 would be retried in vain).

        Its prompts all wait at once; only a lone prompt may pass max_waiting_tokens (LLMEngine's rule).
        """
        limits = getattr(getattr(self.engine.engine, "config", None), "scheduler", None)  # frozen: any thread
        if limits is None or len(prompts) < 2:
            return
        if limits.max_waiting_requests is not None and len(prompts) * n > limits.max_waiting_requests:
            raise OpenAIError(f"n x prompts = {len(prompts) * n} sequences, more than the waiting queue ever holds "
                              f"(max_waiting_requests = {limits.max_waiting_requests})", param="n")
        num_tokens = sum(len(prompt) for prompt in prompts if not isinstance(prompt, str))
        if limits.max_waiting_tokens is not None and num_tokens > limits.max_waiting_tokens:
            raise OpenAIError(f"the prompts hold {num_tokens} tokens, more than the waiting queue ever holds "
                              f"(max_waiting_tokens = {limits.max_waiting_tokens})", param="prompt")

    async def start_requests(self, request_id: str, prompts: Sequence[str | list[int]], params: SamplingParams,
                             priority: int, tenant: Optional[str] = None) -> list[RequestStream]:
        """Add one engine request per prompt; all or nothing (a failure aborts the ones already added).

        The adds go out together, so the engine takes them all in one command batch.
        """
        self._check_fits_waiting_queue(prompts, params.num_sequences)
        sub_ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        results = await asyncio.gather(*(self.engine.add_request(sub_id, prompt, params, priority=priority,
                                                                 tenant=tenant)
                                         for sub_id, prompt in zip(sub_ids, prompts)), return_exceptions=True)
        errors = [result for result in results if isinstance(result, BaseException)]
        if not errors:
            return list(results)  # type: ignore[arg-type]
        for result in results:
            if isinstance(result, RequestStream):
                result.abort()
        error = errors[0]
        if not isinstance(error, Exception):  # e.g. CancelledError: not a refusal
            raise error
        if self.metrics is not None:
            self.metrics.on_rejected("queue_full" if isinstance(error, QueueFullError) else "invalid")
        raise from_engine_error(error, _PARAM_NAMES) from None


async def final_outputs(streams: Sequence[RequestStream]) -> list[RequestOutput]:
    """Wait for every stream's finished output; aborts them all if cancelled."""
    async def last(stream: RequestStream) -> RequestOutput:
        output = None
        async for output in stream:
            pass
        assert output is not None and output.finished
        return output

    try:
        return list(await asyncio.gather(*(last(s) for s in streams)))
    finally:
        for stream in streams:
            stream.abort()


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it (its requests abort) and raise."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work_task.cancel()
        raise
    finally:
        watcher.cancel()
    if work_task.done():
        return work_task.result()
    work_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work_task
    raise ClientDisconnected()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merge_streams(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    pending = {asyncio.ensure_future(anext_or_none(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                output = task.result()
                if output is None:
                    continue
                yield index, output
                pending[asyncio.ensure_future(anext_or_none(streams[index]))] = index
    finally:
        for task in pending:
            task.cancel()


async def anext_or_none(stream: RequestStream) -> Optional[RequestOutput]:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def token_text(tokenizer: Any, token_id: int, logprob: Optional[Logprob]) -> str:
    """The text of one token as OpenAI shows it (" world", not "Ġworld")."""
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def top_entries(position: dict[int, Logprob], num_top: int) -> list[tuple[int, Logprob]]:
    """The ``num_top`` most likely entries of one position, best first."""
    ranked = sorted(position.items(), key=lambda item: item[1].rank)
    return [(token_id, lp) for token_id, lp in ranked if lp.rank <= num_top]


@dataclasses.dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: Optional[list[dict[int, Logprob]]]
    finish_reason: Optional[str]
    stop_reason: Optional[int | str]


class DeltaTracker:
    """What is new per choice since the last send, from a RequestStream's cumulative outputs.

    The stream's text never ends in a partial stop string or an unfinished character (the
    engine holds those back), so everything past what was sent can go out at once.
    """

    def __init__(self, num_choices: int) -> None:
        self._sent_chars = [0] * num_choices
        self._sent_tokens = [0] * num_choices
        self._finished = [False] * num_choices

    def delta(self, slot: int, completion: CompletionOutput) -> Optional[Delta]:
        """What to send for choice ``slot`` now; None when there is nothing new."""
        if self._finished[slot]:
            return None
        finished = completion.finish_reason is not None
        new_text = completion.text[self._sent_chars[slot]:]
        first = self._sent_tokens[slot]
        new_tokens = completion.token_ids[first:]
        if not new_text and not new_tokens and not finished:
            return None
        self._sent_chars[slot] = len(completion.text)
        self._sent_tokens[slot] = first + len(new_tokens)
        self._finished[slot] = finished
        logprobs = None if completion.logprobs is None else completion.logprobs[first:first + len(new_tokens)]
        return Delta(new_text, new_tokens, logprobs, completion.finish_reason, completion.stop_reason)

    def all_finished(self) -> bool:
        return all(self._finished)

    @property
    def num_tokens(self) -> int:
        """Tokens seen so far over every choice (sent, or folded into a later chunk)."""
        return sum(self._sent_tokens)
