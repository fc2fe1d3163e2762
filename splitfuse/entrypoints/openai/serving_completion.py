"""POST /v1/completions: prompts (text, texts, token ids) -> engine requests -> one response or an SSE stream."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from splitfuse.engine.async_engine import RequestStream
from splitfuse.entrypoints.openai.errors import OpenAIError, from_engine_error
from splitfuse.entrypoints.openai.protocol import (CompletionChoice, CompletionChunk, CompletionLogprobs,
                                                   CompletionRequest, CompletionResponse)
from splitfuse.entrypoints.openai.serving_common import (SSE_DONE, ClientDisconnected, DeltaTracker, OpenAIServing,
                                                         final_outputs, merge_streams, run_unless_disconnected, sse,
                                                         sse_error, token_text, top_entries, usage_of,
                                                         usage_info)
from splitfuse.outputs import Logprob, RequestOutput

Prompt = str | list[int]


class OpenAIServingCompletion(OpenAIServing):
    """Handles /v1/completions. Choice ``i`` of prompt ``p`` has index ``p * n + i``, as in OpenAI's API."""

    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        model_name = self.check_model(request.model)
        if request.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        if request.stream and request.best_of is not None and request.best_of > request.n:
            raise OpenAIError("best_of cannot be streamed: which choices are best is known only at the end",
                              param="best_of")
        prompts = _normalize_prompts(request.prompt)
        echo_logprobs = request.echo and request.logprobs is not None
        params = self.sampling_params(request, max_tokens=request.max_tokens, num_prompts=len(prompts),
                                      logprobs=request.logprobs,
                                      prompt_logprobs=request.logprobs if echo_logprobs else None,
                                      best_of=request.best_of)
        prompt_token_ids = await self._tokenize(prompts)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await self.start_requests(request_id, prompt_token_ids, params, request.priority,
                                            request.user)
        created = int(time.time())
        if request.stream:
            chunks = self._stream(request_id, model_name, created, request, prompts, prompt_token_ids, streams)
            return StreamingResponse(chunks, media_type="text/event-stream")
        try:
            outputs = await run_unless_disconnected(raw_request, final_outputs(streams))
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        except Exception as error:
            raise from_engine_error(error) from None
        choices = [self._choice(request, prompts[p], output, c.index + p * request.n, c.text, c.token_ids,
                                c.logprobs, c.finish_reason, c.stop_reason, echo=request.echo)
                   for p, output in enumerate(outputs) for c in output.outputs]
        response = CompletionResponse(id=request_id, created=created, model=model_name, choices=choices,
                                      usage=usage_of(outputs))
        return JSONResponse(response.model_dump())

    async def _tokenize(self, prompts: list[Prompt]) -> list[Prompt]:
        """Token ids of every prompt, from the prompt workers; lengths are checked first, here, in O(1)."""
        for prompt in prompts:
            if isinstance(prompt, str):
                if not prompt:
                    raise OpenAIError("prompt is empty", param="prompt")
                self.check_prompt_chars(len(prompt), f"prompt has {len(prompt)} characters", "prompt")
            else:
                self.check_prompt_tokens(len(prompt))
        if self.engine.tokenizer is None:  # an engine without a tokenizer of ours (a test double) reads text itself
            return prompts
        # Same call as LLMEngine.encode_prompt (special tokens added: BOS), so the tokens are the engine's own.
        return list(await asyncio.gather(*(
            self.workers.tokenize(prompt, add_special_tokens=True) if isinstance(prompt, str) else _ready(prompt)
            for prompt in prompts)))

    def _choice(self, request: CompletionRequest, prompt: Prompt, output: RequestOutput, index: int, text: str,
                token_ids: Sequence[int], logprobs: Optional[list[dict[int, Logprob]]],
                finish_reason: Optional[str], stop_reason: Optional[int | str], *, echo: bool,
                text_offset: int = 0) -> CompletionChoice:
        """One choice (or one stream chunk of it); with ``echo`` the prompt comes first."""
        choice_logprobs = None
        if request.logprobs is not None:
            choice_logprobs = CompletionLogprobs()
            if echo:
                text_offset = self._append_prompt_logprobs(choice_logprobs, output, request.logprobs)
            self._append_logprobs(choice_logprobs, token_ids, logprobs, request.logprobs, text_offset)
        if echo:
            text = self._prompt_text(prompt, output) + text
        return CompletionChoice(index=index, text=text, logprobs=choice_logprobs, finish_reason=finish_reason,
                                stop_reason=stop_reason)

    def _prompt_text(self, prompt: Prompt, output: RequestOutput) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.engine.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=True)

    def _append_logprobs(self, target: CompletionLogprobs, token_ids: Sequence[int],
                         logprobs: Optional[list[dict[int, Logprob]]], num_top: int, text_offset: int) -> int:
        """Append one entry per token to the legacy parallel lists; returns the next text offset."""
        tokenizer = self.engine.tokenizer
        for position, token_id in enumerate(token_ids):
            entries = logprobs[position] if logprobs is not None and position < len(logprobs) else None
            chosen = entries.get(token_id) if entries else None
            token = token_text(tokenizer, token_id, chosen)
            target.tokens.append(token)
            target.token_logprobs.append(chosen.logprob if chosen else None)
            if entries:
                # OpenAI lists the sampled token too. Keys are texts, and several ids can decode to the
                # same text (e.g. lone UTF-8 bytes -> U+FFFD): the sampled token's entry wins.
                top = {token: chosen.logprob} if chosen is not None else {}
                for tid, lp in top_entries(entries, num_top):
                    top.setdefault(token_text(tokenizer, tid, lp), lp.logprob)
                target.top_logprobs.append(top)
            else:
                target.top_logprobs.append(None)
            target.text_offset.append(text_offset)
            text_offset += len(token)
        return text_offset

    def _append_prompt_logprobs(self, target: CompletionLogprobs, output: RequestOutput, num_top: int) -> int:
        # The first prompt token has no logprob (nothing precedes it): entry None, as OpenAI does.
        positions = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
        return self._append_logprobs(target, output.prompt_token_ids, list(positions), num_top, 0)

    async def _stream(self, request_id: str, model_name: str, created: int, request: CompletionRequest,
                      prompts: list[Prompt], prompt_token_ids: list[Prompt],
                      streams: list[RequestStream]) -> AsyncIterator[str]:
        n = request.n
        tracker = DeltaTracker(len(prompts) * n)
        text_offsets = [0] * (len(prompts) * n)
        finals: list[Optional[RequestOutput]] = [None] * len(prompts)
        echo_pending = [request.echo] * (len(prompts) * n)  # each choice starts with the prompt once
        options = request.stream_options
        include_usage = options is not None and options.include_usage
        continuous_usage = include_usage and options.continuous_usage_stats
        # Prompt tokens per prompt: known before the first output (an engine without a tokenizer: from it).
        num_prompt_tokens = [len(p) if isinstance(p, list) else 0 for p in prompt_token_ids]

        def chunk(choices: list[CompletionChoice]) -> str:
            usage = usage_info(sum(num_prompt_tokens), tracker.num_tokens) if continuous_usage else None
            return sse(CompletionChunk(id=request_id, created=created, model=model_name, choices=choices,
                                       usage=usage))

        try:
            async with aclosing(merge_streams(streams)) as merged:
                async for p, output in merged:
                    num_prompt_tokens[p] = len(output.prompt_token_ids)
                    choices = []
                    for completion in output.outputs:
                        slot = p * n + completion.index
                        delta = tracker.delta(slot, completion)
                        if delta is None:
                            continue
                        echo, echo_pending[slot] = echo_pending[slot], False
                        if not (delta.text or delta.finish_reason or echo or request.logprobs is not None):
                            continue  # a token with no visible text yet
                        choice = self._choice(request, prompts[p], output, slot, delta.text, delta.token_ids,
                                              delta.logprobs, delta.finish_reason, delta.stop_reason,
                                              echo=echo, text_offset=text_offsets[slot])
                        if choice.logprobs is not None:  # offsets continue across chunks
                            text_offsets[slot] += sum(map(len, choice.logprobs.tokens))
                        choices.append(choice)
                    if output.finished:
                        finals[p] = output
                    if choices:
                        yield chunk(choices)
            if include_usage:
                usage = usage_of([o for o in finals if o is not None])
                yield sse(CompletionChunk(id=request_id, created=created, model=model_name, choices=[],
                                          usage=usage))
            yield SSE_DONE
        except Exception as error:  # the engine failed mid-stream: status 200 is gone, report in-band
            yield sse_error(error)
            yield SSE_DONE
        finally:
            for stream in streams:
                stream.abort()


async def _ready(token_ids: list[int]) -> list[int]:
    return token_ids


def _normalize_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    """One entry per engine request: "a" -> ["a"]; [1, 2] -> [[1, 2]]; ["a", "b"] and [[1], [2]] stay lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIError("prompt must not be empty", param="prompt")
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]
