"""AsyncLLMEngine against a scripted fake engine: streams, aborts, refusals, step failures, shutdown, no busy-wait.

The fake is the right tool here: it makes failures and timing exact (a step that raises,
a queue that is full, a count of how often the thread polls), which a real model cannot.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass

import httpx
import pytest

from splitfuse.engine.async_engine import (AsyncLLMEngine, EngineDeadError, EngineStepError, EngineStoppedError,
                                           QueueFullError)
from splitfuse.entrypoints.openai.server import ServerThread, build_app
from splitfuse.outputs import CompletionOutput, RequestMetrics, RequestOutput, RequestOutputKind
from splitfuse.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(60)


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


class FakeEngine:
    """LLMEngine's interface; each step echoes the next prompt token ("t<id>") for every running request.

    A request holds one KV block while it lives; ``max_running`` requests run, the rest wait.
    """

    tokenizer = None
    max_model_len = 64
    vocab_size = 100
    num_blocks = 8

    def __init__(self, max_running: int = 4, max_waiting: int | None = None, step_delay_s: float = 0.0) -> None:
        self.requests: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.step_delay_s = step_delay_s
        self.fail_next_step = False
        self.fail_aborts = False
        self.aborted: list[str] = []
        self.shut_down = False
        self.calls_has_unfinished = 0
        self.thread_ids: set[int] = set()  # every thread that called into the engine

    def add_request(self, request_id, prompt, params, arrival_time=None, priority=0,
                    output_kind=RequestOutputKind.CUMULATIVE) -> None:
        assert output_kind == RequestOutputKind.DELTA  # what AsyncLLMEngine asks for
        self.thread_ids.add(threading.get_ident())
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise ValueError("prompt is empty")
        if self.max_waiting is not None and self._num_waiting() + 1 > self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
        self.requests[request_id] = (list(prompt), params, [])

    def add_requests(self, requests) -> list:
        """LLMEngine.add_requests: each NewRequest as add_request takes it; per request, None or its error."""
        errors = []
        for new in requests:
            try:
                self.add_request(new.request_id, new.prompt, new.params, new.arrival_time, new.priority,
                                 new.output_kind)
                errors.append(None)
            except ValueError as error:
                errors.append(error)
        return errors

    def abort_request(self, request_ids) -> None:
        self.thread_ids.add(threading.get_ident())
        if self.fail_aborts:
            raise RuntimeError("simulated corrupt state")
        for request_id in request_ids:
            if self.requests.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.thread_ids.add(threading.get_ident())
        self.shut_down = True

    def has_unfinished_requests(self) -> bool:
        self.calls_has_unfinished += 1
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("simulated kernel failure")
        outputs = []
        for request_id in list(self.requests)[:self.max_running]:
            prompt, params, generated = self.requests[request_id]
            generated.append(prompt[len(generated) % len(prompt)])
            done = len(generated) >= params.max_tokens
            if done:
                del self.requests[request_id]
            # A DELTA output: this step's token and text only.
            completion = CompletionOutput(0, f"t{generated[-1]} ", [generated[-1]],
                                          finish_reason="length" if done else None)
            outputs.append(RequestOutput(request_id, None, prompt, [completion], done,
                                         RequestMetrics(arrival_time=time.time())))
        return outputs

    def _num_waiting(self) -> int:
        return max(0, len(self.requests) - self.max_running)

    def get_stats(self) -> FakeStats:
        used = len(self.requests)
        return FakeStats(num_running=min(used, self.max_running), num_waiting=self._num_waiting(),
                         num_free_blocks=self.num_blocks - used, num_total_blocks=self.num_blocks,
                         kv_cache_usage=used / self.num_blocks)


class RecordingObserver:
    def __init__(self) -> None:
        self.ttfts: list[float] = []
        self.itls: list[float] = []
        self.finished: list[str] = []

    def on_first_token(self, ttft_s: float) -> None:
        self.ttfts.append(ttft_s)

    def on_inter_token(self, itl_s: float) -> None:
        self.itls.append(itl_s)

    def on_finished(self, finish_reason: str, e2e_s: float) -> None:
        self.finished.append(finish_reason)


def run(coroutine_fn, *args):
    return asyncio.run(coroutine_fn(*args))


def test_generate_streams_cumulative_outputs_until_finished():
    async def main():
        fake = FakeEngine()
        observer = RecordingObserver()
        engine = AsyncLLMEngine(fake, observer=observer)
        engine.start()
        texts = [o.outputs[0].text async for o in engine.generate("a", [5, 6, 7], SamplingParams(max_tokens=4))]
        await engine.shutdown()
        return fake, engine, observer, texts

    fake, engine, observer, texts = run(main)
    # Coalescing may skip intermediate outputs, never the final one; each is a prefix of the next.
    assert texts[-1] == "t5 t6 t7 t5 "
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert fake.thread_ids == {next(iter(fake.thread_ids))} != {threading.get_ident()}  # one thread, not ours
    assert engine.num_unfinished == 0 and engine.stats.num_free_blocks == FakeEngine.num_blocks
    assert len(observer.ttfts) == 1 and observer.finished == ["length"]
    assert len(observer.ttfts) + len(observer.itls) == 4  # one latency per generated token


def test_bad_request_raises_from_add_request_and_engine_keeps_serving():
    async def main():
        engine = AsyncLLMEngine(FakeEngine())
        engine.start()
        with pytest.raises(ValueError, match="prompt is empty"):
            await engine.add_request("a", [], SamplingParams(max_tokens=2))
        outputs = [o async for o in engine.generate("a", [1], SamplingParams(max_tokens=2))]
        await engine.shutdown()
        return outputs

    assert run(main)[-1].outputs[0].token_ids == [1, 1]


def test_queue_full_is_reported_before_any_output():
    async def main():
        fake = FakeEngine(max_running=1, max_waiting=1, step_delay_s=0.005)
        engine = AsyncLLMEngine(fake)
        engine.start()
        params = SamplingParams(max_tokens=100_000)
        first = await engine.add_request("a", [1], params)
        second = await engine.add_request("b", [2], params)
        with pytest.raises(QueueFullError, match=r"waiting queue is full \(1 requests\)"):
            await engine.add_request("c", [3], params)
        first.abort()
        second.abort()
        await engine.shutdown()

    run(main)


def test_cancelled_consumer_aborts_its_request_and_frees_its_block():
    async def main():
        fake = FakeEngine(step_delay_s=0.005)
        engine = AsyncLLMEngine(fake)
        engine.start()

        async def consume(request_id: str) -> None:
            async with aclosing(engine.generate(request_id, [1, 2], SamplingParams(max_tokens=10_000))) as outputs:
                async for _ in outputs:
                    pass

        tasks = [asyncio.create_task(consume(f"r{i}")) for i in range(6)]
        await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(100):  # the abort is applied by the engine thread at its next command check
            if not fake.requests:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats
        await engine.shutdown()
        return fake, engine, stats

    fake, engine, stats = run(main)
    assert sorted(fake.aborted) == [f"r{i}" for i in range(6)]
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == stats.num_waiting == 0
    assert engine.num_unfinished == 0


def test_failed_step_fails_in_flight_requests_and_the_engine_recovers():
    async def main():
        fake = FakeEngine(step_delay_s=0.01)
        engine = AsyncLLMEngine(fake)
        engine.start()
        stream = await engine.add_request("a", [1], SamplingParams(max_tokens=1000))
        await stream.__anext__()
        fake.fail_next_step = True
        with pytest.raises(EngineStepError, match="simulated kernel failure"):
            async for _ in stream:
                pass
        after = [o async for o in engine.generate("b", [2], SamplingParams(max_tokens=3))]
        alive = engine.is_alive
        await engine.shutdown()
        return fake, after, alive

    fake, after, alive = run(main)
    assert fake.aborted == ["a"] and alive
    assert after[-1].outputs[0].token_ids == [2, 2, 2]


def test_shutdown_refuses_new_requests_and_aborts_unfinished_ones_after_the_timeout():
    async def main():
        fake = FakeEngine(step_delay_s=0.01)
        engine = AsyncLLMEngine(fake)
        engine.start()
        stream = await engine.add_request("long", [1], SamplingParams(max_tokens=100_000))
        short = await engine.add_request("short", [1], SamplingParams(max_tokens=2))
        shutdown = asyncio.create_task(engine.shutdown(timeout_s=0.3))
        await asyncio.sleep(0)
        with pytest.raises(EngineStoppedError):
            await engine.add_request("late", [1], SamplingParams(max_tokens=2))
        short_outputs = [o async for o in short]
        with pytest.raises(EngineStoppedError):
            async for _ in stream:
                pass
        await shutdown
        return fake, engine, short_outputs

    fake, engine, short_outputs = run(main)
    assert short_outputs[-1].finished  # in-flight work inside the timeout completes
    assert fake.aborted == ["long"] and not engine.is_alive
    assert fake.shut_down  # the engine (and a core process behind it) is stopped too, from the engine thread


def test_idle_engine_thread_blocks_instead_of_polling():
    async def main():
        fake = FakeEngine()
        engine = AsyncLLMEngine(fake)
        engine.start()
        await asyncio.sleep(0.05)
        before = fake.calls_has_unfinished
        await asyncio.sleep(0.3)
        idle_calls = fake.calls_has_unfinished - before
        await engine.shutdown()
        return idle_calls

    assert run(main) == 0


def test_queue_full_and_step_failure_over_http_keep_the_server_serving():
    fake = FakeEngine(max_running=1, max_waiting=1, step_delay_s=0.002)
    engine = AsyncLLMEngine(fake)
    body = {"model": "fake", "prompt": [1, 2], "max_tokens": 3}
    long_body = {**body, "max_tokens": 100_000, "stream": True}
    with ServerThread(build_app(engine, ["fake"])) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        with client.stream("POST", "/v1/completions", json=long_body) as running, \
                client.stream("POST", "/v1/completions", json=long_body) as waiting:
            assert running.status_code == waiting.status_code == 200
            refused = client.post("/v1/completions", json=body)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "queue_full"
            assert refused.json()["error"]["message"] == "the waiting queue is full (1 requests)"
        deadline = time.monotonic() + 10
        while fake.requests and time.monotonic() < deadline:  # the two streams were dropped: aborted
            time.sleep(0.01)
        assert not fake.requests
        fake.fail_next_step = True
        failed = client.post("/v1/completions", json=body)
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error"
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/completions", json=body)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "t1 t2 t1 "


def test_an_engine_that_cannot_recover_reports_503_and_unhealthy():
    fake = FakeEngine(step_delay_s=0.002)
    engine = AsyncLLMEngine(fake)
    body = {"model": "fake", "prompt": [1, 2], "max_tokens": 1000}
    with ServerThread(build_app(engine, ["fake"])) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        fake.fail_next_step = fake.fail_aborts = True  # the step fails, and so does the clean-up
        dead = client.post("/v1/completions", json=body)
        assert dead.status_code == 503 and "engine thread died" in dead.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        refused = client.post("/v1/completions", json=body)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
    assert not engine.is_alive


def test_engine_dead_error_is_raised_to_waiting_callers():
    async def main():
        fake = FakeEngine(step_delay_s=0.002)
        engine = AsyncLLMEngine(fake)
        engine.start()
        stream = await engine.add_request("a", [1], SamplingParams(max_tokens=1000))
        fake.fail_next_step = fake.fail_aborts = True
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_request("b", [1], SamplingParams(max_tokens=2))
        await engine.shutdown(timeout_s=0.1)

    run(main)


def test_from_config_builds_the_engine_on_a_thread_that_has_ended(monkeypatch):
    # The caller's thread (the event loop's) must start no OpenMP work: the engine, and with it the
    # model load, is built on a helper thread that ends before from_config returns.
    from splitfuse.engine import llm_engine

    built_on: list[threading.Thread] = []

    def fake_from_config(config):
        built_on.append(threading.current_thread())
        return FakeEngine()

    monkeypatch.setattr(llm_engine.LLMEngine, "from_config", staticmethod(fake_from_config))
    engine = AsyncLLMEngine.from_config(object())
    assert isinstance(engine.engine, FakeEngine)
    assert built_on[0] is not threading.current_thread() and not built_on[0].is_alive()


def test_from_config_raises_the_build_error_on_the_calling_thread(monkeypatch):
    from splitfuse.engine import llm_engine

    def failing_from_config(config):
        raise ValueError("unknown architecture 'Foo'")

    monkeypatch.setattr(llm_engine.LLMEngine, "from_config", staticmethod(failing_from_config))
    with pytest.raises(ValueError, match="unknown architecture 'Foo'"):
        AsyncLLMEngine.from_config(object())
