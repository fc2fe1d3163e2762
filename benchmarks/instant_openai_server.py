"""A stand-in OpenAI server that answers at once (for measuring what sits in front of it, e.g. the router).

``python benchmarks/instant_openai_server.py PORT``: ``/v1/completions`` streams ``max_tokens`` one-token
chunks with no delay (or returns them in one JSON body), ``/health`` and ``/v1/models`` answer, no model runs.
"""

from __future__ import annotations

import json
import sys

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

app = FastAPI()


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@app.get("/v1/models")
async def models() -> dict:
    return {"object": "list", "data": [{"id": "instant", "object": "model", "owned_by": "bench"}]}


@app.post("/v1/completions")
async def completions(request: Request):
    body = await request.json()
    max_tokens = int(body.get("max_tokens") or 16)
    prompt = body.get("prompt")
    prompt_tokens = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
             "total_tokens": prompt_tokens + max_tokens}
    if not body.get("stream"):
        return JSONResponse({"id": "cmpl-instant", "object": "text_completion", "model": "instant",
                             "choices": [{"index": 0, "text": " x" * max_tokens, "finish_reason": "length"}],
                             "usage": usage})

    async def events():
        for index in range(max_tokens):
            done = index == max_tokens - 1
            chunk = {"id": "cmpl-instant", "object": "text_completion", "model": "instant",
                     "choices": [{"index": 0, "text": " x", "finish_reason": "length" if done else None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield f"data: {json.dumps({'id': 'cmpl-instant', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
