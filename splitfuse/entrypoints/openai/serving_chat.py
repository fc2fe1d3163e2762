"""POST /v1/chat/completions: messages -> the checkpoint's chat template -> token ids -> engine -> reply or SSE.

The template is rendered by a prompt worker in a sandboxed process (prompt_workers.py); a template sent
in the request is refused unless the server trusts them (--trust-request-chat-template).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from splitfuse.engine.async_engine import RequestStream
from splitfuse.entrypoints.openai.errors import OpenAIError, from_engine_error
from splitfuse.entrypoints.openai.prompt_workers import RenderFailed
from splitfuse.entrypoints.openai.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                                   ChatCompletionResponse, ChatLogprobs, ChatMessage,
                                                   ChatResponseMessage, ChatStreamChoice, ChatTokenLogprob,
                                                   DeltaMessage, TopLogprob)
from splitfuse.entrypoints.openai.serving_common import (SSE_DONE, ClientDisconnected, DeltaTracker, OpenAIServing,
                                                         final_outputs, merge_streams, run_unless_disconnected, sse,
                                                         sse_error, token_text, top_entries, usage_of,
                                                         usage_info)
from splitfuse.entrypoints.openai.tool_calls import (ToolCallStream, ToolPlan, hermes_text, reply_of, resolve_tools,
                                                     template_reads_tools, template_tools, tools_system_prompt)
from splitfuse.outputs import Logprob, RequestOutput

_UNTRUSTED_TEMPLATE = ("this server does not render chat templates sent in requests; start it with "
                       "--trust-request-chat-template to allow them")
# How a failed render is reported: kind -> (status, code).
_RENDER_FAILURES = {"timeout": (400, "chat_template_timeout"), "invalid": (400, "chat_template_error"),
                    "unavailable": (503, "engine_unavailable"), "crashed": (500, "chat_template_worker_failed")}
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and SamplingParams'
# Stand-in when the engine omits the chosen token's logprob (JSON has no -inf).
_MISSING_LOGPROB = -9999.0


class OpenAIServingChat(OpenAIServing):
    """Handles /v1/chat/completions with the chat template from the checkpoint's tokenizer config."""

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        model_name = self.check_model(request.model)
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if request.top_logprobs is not None and not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise OpenAIError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {request.top_logprobs}",
                              param="top_logprobs")
        if request.continue_final_message:
            if request.add_generation_prompt:
                raise OpenAIError("continue_final_message and add_generation_prompt cannot both be true",
                                  param="continue_final_message")
            if request.messages[-1].role != "assistant":
                raise OpenAIError("continue_final_message needs the last message to be the assistant's, got "
                                  f"{request.messages[-1].role!r}", param="continue_final_message")
        template = self._template(request)
        plan = resolve_tools(request.tools, request.tool_choice, request.parallel_tool_calls)
        # No max_tokens: the engine gives the request what is left of the context window.
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        params = self.sampling_params(request, max_tokens=max_tokens,
                                      logprobs=(request.top_logprobs or 0) if request.logprobs else None)
        if plan.constraint is not None:
            if params.structured_outputs is not None:
                raise OpenAIError(f"tool_choice {plan.mode!r} constrains the reply already; it cannot take an "
                                  f"output constraint (response_format, structured_outputs, guided_*) too",
                                  param="tool_choice")
            params = params.clone(structured_outputs=plan.constraint)
        prompt_token_ids = await self.render_prompt(request, template, plan)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        (stream,) = await self.start_requests(request_id, [prompt_token_ids], params, request.priority,
                                              request.user)
        created = int(time.time())
        if request.stream:
            chunks = self._stream(request_id, model_name, created, request, len(prompt_token_ids), stream, plan)
            return StreamingResponse(chunks, media_type="text/event-stream")
        try:
            (output,) = await run_unless_disconnected(raw_request, final_outputs([stream]))
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception as error:
            raise from_engine_error(error) from None
        choices = []
        for c in output.outputs:
            content, calls = reply_of(c.text, plan)
            choices.append(ChatChoice(
                index=c.index, message=ChatResponseMessage(content=content, tool_calls=[x.to_openai() for x in calls]),
                logprobs=self._logprobs(request, c.token_ids, c.logprobs),
                finish_reason=_finish_reason(c.finish_reason, calls), stop_reason=c.stop_reason))
        response = ChatCompletionResponse(id=request_id, created=created, model=model_name, choices=choices,
                                          usage=usage_of([output]))
        return JSONResponse(response.model_dump())

    def _template(self, request: ChatCompletionRequest) -> str:
        """The template to render: the model's (or one it names), or the request's if the server trusts those."""
        requested = request.chat_template
        if requested is None and request.chat_template_kwargs:
            requested = request.chat_template_kwargs.get("chat_template")  # type: ignore[assignment]
        if requested is not None and not isinstance(requested, str):
            raise OpenAIError("chat_template must be a string", param="chat_template")
        tokenizer = self.engine.tokenizer
        own = getattr(tokenizer, "chat_template", None)
        if requested is None or (isinstance(own, dict) and requested in own):  # one of the checkpoint's own
            try:
                return tokenizer.get_chat_template(requested)
            except (AttributeError, ValueError) as error:
                raise OpenAIError(f"cannot apply the chat template: {error}", param="messages") from None
        if not self.config.trust_request_chat_template:
            raise OpenAIError(_UNTRUSTED_TEMPLATE, param="chat_template", code="chat_template_not_allowed")
        return requested

    async def render_prompt(self, request: ChatCompletionRequest, template: str,
                            plan: Optional[ToolPlan] = None) -> list[int]:
        """Messages -> prompt token ids, rendered and tokenized by the prompt workers (400 when it cannot render).

        Tools go to a template that reads ``tools``; one that does not gets them as a system message, and the
        conversation's tool calls and results as text (tool_calls.py).
        """
        plan = plan or ToolPlan("none")
        reads_tools = template_reads_tools(template)
        messages = [_to_template_message(m, reads_tools) for m in request.messages]
        if plan.renders_tools and not reads_tools:
            instructions = tools_system_prompt(plan)
            if messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{instructions}"}
            else:
                messages.insert(0, {"role": "system", "content": instructions})
        # The variables apply_chat_template gives a template: special tokens, the client's kwargs, then ours.
        variables = {**self.engine.tokenizer.special_tokens_map,
                     **{k: v for k, v in (request.chat_template_kwargs or {}).items() if k != "chat_template"},
                     "messages": messages, "tools": template_tools(plan) if reads_tools else None,
                     "documents": None, "add_generation_prompt": request.add_generation_prompt}
        try:
            text = await self.workers.render(template, variables)
        except RenderFailed as failure:
            if failure.kind == "too_long" and self.workers.max_prompt_chars is not None:
                raise self.too_many_chars(f"the chat prompt is too long ({failure.message})", "messages") from None
            status, code = _RENDER_FAILURES.get(failure.kind, (400, "chat_template_error"))
            raise OpenAIError(f"cannot apply the chat template: {failure.message}", status,
                              param="messages" if status == 400 else None, code=code) from None
        if request.continue_final_message:
            text = cut_after_final_message(text, variables["messages"][-1]["content"])
        self.check_prompt_chars(len(text), f"the chat prompt has {len(text)} characters", "messages")
        # The template already wrote BOS and friends as text; adding them again would double them.
        return await self.workers.tokenize(text, add_special_tokens=False)

    def _logprobs(self, request: ChatCompletionRequest, token_ids: Sequence[int],
                  logprobs: Optional[list[dict[int, Logprob]]]) -> Optional[ChatLogprobs]:
        if not request.logprobs:
            return None
        tokenizer = self.engine.tokenizer
        num_top = request.top_logprobs or 0
        content = []
        for position, token_id in enumerate(token_ids):
            entries = logprobs[position] if logprobs is not None and position < len(logprobs) else {}
            chosen = entries.get(token_id)
            token = token_text(tokenizer, token_id, chosen)
            top = [_top_logprob(token_text(tokenizer, tid, lp), lp.logprob) for tid, lp in top_entries(entries, num_top)]
            logprob = chosen.logprob if chosen is not None else _MISSING_LOGPROB
            content.append(ChatTokenLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")),
                                            top_logprobs=top))
        return ChatLogprobs(content=content)

    async def _stream(self, request_id: str, model_name: str, created: int, request: ChatCompletionRequest,
                      num_prompt_tokens: int, stream: RequestStream, plan: ToolPlan) -> AsyncIterator[str]:
        tracker = DeltaTracker(request.n)
        replies = [ToolCallStream(plan) for _ in range(request.n)]
        final: Optional[RequestOutput] = None
        options = request.stream_options
        include_usage = options is not None and options.include_usage
        continuous_usage = include_usage and options.continuous_usage_stats

        def chunk(choices: list[ChatStreamChoice], usage: Any = None) -> str:
            if usage is None and continuous_usage:
                usage = usage_info(num_prompt_tokens, tracker.num_tokens)
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model_name, choices=choices,
                                           usage=usage))

        try:
            # OpenAI opens every choice with the role and empty content.
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                         for i in range(request.n)])
            async with aclosing(merge_streams([stream])) as outputs:
                async for _, output in outputs:
                    choices = []
                    for completion in output.outputs:
                        delta = tracker.delta(completion.index, completion)
                        if delta is None:
                            continue
                        reply = replies[completion.index]
                        content, calls = reply.add(delta.text or ""), None
                        if delta.finish_reason is not None:
                            rest, calls = reply.finish()
                            content += rest
                        if not (content or calls or delta.finish_reason or request.logprobs):
                            continue
                        choices.append(ChatStreamChoice(
                            index=completion.index, delta=DeltaMessage(content=content or None, tool_calls=calls or None),
                            logprobs=self._logprobs(request, delta.token_ids, delta.logprobs),
                            finish_reason=_finish_reason(delta.finish_reason, calls),
                            stop_reason=delta.stop_reason))
                    if output.finished:
                        final = output
                    if choices:
                        yield chunk(choices)
            if include_usage and final is not None:
                yield chunk([], usage_of([final]))
            yield SSE_DONE
        except Exception as error:  # the engine failed mid-stream: report in-band, the status is already 200
            yield sse_error(error)
            yield SSE_DONE
        finally:
            stream.abort()


def cut_after_final_message(rendered: str, final: str) -> str:
    """The rendered chat cut right after the final message's text, so what the template closes it with is gone.

    ``"<|im_start|>assistant\\nThe capital<|im_end|>\\n"``, ``"The capital"`` ->
    ``"<|im_start|>assistant\\nThe capital"``. A template that strips the message is matched on the
    stripped text (as transformers does); an empty message, or one the template does not show, is a 400.
    """
    for text in (final, final.strip()):
        if text and text in rendered:
            return rendered[:rendered.rindex(text) + len(text)]
    raise OpenAIError("continue_final_message: the chat template does not show the last message's text, so the "
                      "reply cannot go on from it", param="messages")


def _finish_reason(finish_reason: Optional[str], calls: Any) -> Optional[str]:
    """OpenAI's "tool_calls" for a reply that ended by itself in calls; "length" and the rest stay."""
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def _to_template_message(message: ChatMessage, reads_tools: bool = False) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        content = "\n".join(part.text for part in content)
    content = content or ""
    # "developer" is OpenAI's newer name for "system"; checkpoint templates know only the latter.
    role = "system" if message.role == "developer" else message.role
    if message.tool_calls:
        calls = [call.model_dump() for call in message.tool_calls]
        if not reads_tools:
            return {"role": role, "content": "\n".join(filter(None, [content, hermes_text(calls)]))}
        for call in calls:  # templates (and transformers) take the arguments as an object
            with contextlib.suppress(json.JSONDecodeError):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        return {"role": role, "content": content, "tool_calls": calls}
    if role == "tool":
        if not reads_tools:  # a tool's result as Hermes writes it, in a user turn
            return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
        return {"role": "tool", "content": content, "tool_call_id": message.tool_call_id or ""}
    return {"role": role, "content": content}


def _top_logprob(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))
