"""The whole engine loop on a FakeExecutor and a VirtualClock: exact plans, tokens, texts, times, blocks and KV events.

Token-only behaviour drives ``EngineCore`` directly; text, stop strings, n > 1 and request
metrics go through ``LLMEngine`` with the tiny tokenizer. Tokens come from the fake's default
rule ``(last * 7 + len) % 512`` or from per-request scripts; EOS is token 2 (``</s>``).
"""

from __future__ import annotations

import pytest
import torch

from splitfuse.checkpoint_factory import tiny_llama_config
from splitfuse.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitfuse.clock import VirtualClock
from splitfuse.engine.core import EngineCore, QueueFullError
from splitfuse.engine.core_client import InProcClient
from splitfuse.engine.kv_cache import KVCacheManager
from splitfuse.engine.kv_cache.hashing import hash_block
from splitfuse.engine.llm_engine import LLMEngine
from splitfuse.engine.request import Request
from splitfuse.engine.protocol import BlockRemoved, BlockStored, EngineCoreRequest
from splitfuse.engine.resolved_config import ResolvedConfig
from splitfuse.engine.scheduler import Scheduler
from splitfuse.models.config import ArchConfig
from splitfuse.outputs import Logprob, RequestMetrics
from splitfuse.sampling_params import SamplingParams
from splitfuse.step import SchedulerOutput
from splitfuse.worker.fake_executor import FakeExecutor

EOS = 2


def make_core(*, num_blocks=64, block_size=4, budget=64, max_num_seqs=8, policy="fcfs", max_model_len=None,
              max_waiting_requests=None, max_waiting_tokens=None, **executor_kwargs):
    """(core, executor, clock): the parts ``EngineCore.from_config`` would build, with the fake executor."""
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, policy=policy,
                             max_waiting_requests=max_waiting_requests, max_waiting_tokens=max_waiting_tokens)
    scheduler = Scheduler(config, KVCacheManager(num_blocks, block_size), eos_token_ids=frozenset({EOS}),
                          max_model_len=max_model_len)
    clock = VirtualClock()
    executor = FakeExecutor(clock, block_size=block_size, **executor_kwargs)
    return EngineCore(scheduler, executor, clock), executor, clock


def core_request(request_id, prompt_token_ids, max_tokens, priority=0, **params):
    return EngineCoreRequest(request_id, list(prompt_token_ids), SamplingParams(max_tokens=max_tokens, **params),
                             arrival_time=0.0, max_tokens=max_tokens, priority=priority)


def run_core(core):
    """Steps until done: (tokens per request, (finish_reason, stop_reason) per request)."""
    tokens, finished = {}, {}
    for _ in range(200):
        if not core.has_unfinished_requests():
            return tokens, finished
        for output in core.step().outputs:
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.finish_reason is not None:
                finished[output.request_id] = (output.finish_reason, output.stop_reason)
    raise AssertionError("the engine did not finish in 200 steps")


def make_engine(tokenizer, *, num_blocks=64, block_size=4, budget=64, max_num_seqs=8, max_waiting_requests=None,
                max_waiting_tokens=None, **executor_kwargs):
    """(LLMEngine, executor, clock) over a hand-built ResolvedConfig: no checkpoint, no model."""
    config = EngineConfig(
        ModelConfig(model="fake"), CacheConfig(block_size=block_size, num_gpu_blocks_override=num_blocks),
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                        max_waiting_requests=max_waiting_requests, max_waiting_tokens=max_waiting_tokens))
    resolved = ResolvedConfig(model_path="fake", tokenizer=tokenizer,
                              arch=ArchConfig.from_hf_dict(tiny_llama_config().to_dict()), dtype=torch.float32,
                              device=torch.device("cpu"), max_model_len=128, num_blocks=num_blocks,
                              eos_token_ids=frozenset({tokenizer.eos_token_id}))
    core, executor, clock = make_core(num_blocks=num_blocks, block_size=block_size, budget=budget,
                                      max_num_seqs=max_num_seqs, max_model_len=resolved.max_model_len,
                                      max_waiting_requests=max_waiting_requests,
                                      max_waiting_tokens=max_waiting_tokens, vocab_size=resolved.arch.vocab_size,
                                      **executor_kwargs)
    return LLMEngine(config, client=InProcClient(core), resolved=resolved, clock=clock), executor, clock


def run_engine(engine):
    """Steps until done: the final RequestOutput of each request."""
    final = {}
    for _ in range(200):
        if not engine.has_unfinished_requests():
            return final
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
    raise AssertionError("the engine did not finish in 200 steps")


# -- (a) preemption -------------------------------------------------------------------------

def add_three_prompts(core):
    for index, name in enumerate("abc"):
        start = 100 * (index + 1)
        core.add_requests([core_request(name, range(start, start + 8), max_tokens=6)])


TOKENS_ABC = {"a": [245, 188, 302, 77, 39, 286], "b": [433, 480, 298, 49, 355, 450],
              "c": [109, 260, 294, 21, 159, 102]}


def test_without_preemption_three_requests_decode_side_by_side():
    core, executor, _ = make_core(num_blocks=64)
    add_three_prompts(core)
    assert run_core(core) == (TOKENS_ABC, {name: ("length", None) for name in "abc"})
    assert executor.plans == [{"a": 8, "b": 8, "c": 8}] + [{"a": 1, "b": 1, "c": 1}] * 5
    assert all(not output.preempted_request_ids for output in executor.scheduler_outputs)


def test_preempted_requests_resume_whole_and_draw_the_same_tokens():
    # 6 blocks of 4: the three prompts fill them; each decode that needs a block preempts the newest.
    core, executor, _ = make_core(num_blocks=6)
    add_three_prompts(core)
    assert run_core(core) == (TOKENS_ABC, {name: ("length", None) for name in "abc"})
    outputs = executor.scheduler_outputs
    assert [output.preempted_request_ids for output in outputs] == [[], ["c"], [], [], [], ["b"]] + [[]] * 6
    assert executor.plans == [{"a": 8, "b": 8, "c": 8}, *[{"a": 1, "b": 1}] * 4, {"a": 1}, {"b": 5}, {"c": 9},
                              *[{"c": 1}] * 4]
    # b comes back with its 5 tokens; its first two blocks were still cached, its third was taken by a.
    (b_resumed,) = outputs[6].new_requests
    assert (b_resumed.request_id, b_resumed.output_token_ids, b_resumed.num_computed_tokens,
            b_resumed.block_ids) == ("b", TOKENS_ABC["b"][:5], 8, [2, 3, 4, 5])
    (c_resumed,) = outputs[7].new_requests
    assert (c_resumed.output_token_ids, c_resumed.num_computed_tokens, c_resumed.block_ids) == ([109], 0, [1, 0, 5])
    assert [output.finished_request_ids for output in outputs[6:8]] == [["a"], ["b"]]
    assert core.stats().num_preemptions == 2
    assert core.scheduler.kv_cache.num_free_blocks == 6


# -- (b) n > 1 ------------------------------------------------------------------------------

def test_siblings_wait_for_the_leader_prompt_then_hit_its_blocks(tiny_tokenizer):
    # " cat." and " sat." in the tiny tokenizer.
    engine, executor, _ = make_engine(tiny_tokenizer, next_token={"p#0": [280, 370, 18], "p#1": [296, 370, 18]})
    engine.add_request("p", list(range(10, 20)), SamplingParams(n=2, max_tokens=3), arrival_time=0.0)
    (output,) = run_engine(engine).values()
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in output.outputs] == [
        (0, " cat.", [280, 370, 18], "length"), (1, " sat.", [296, 370, 18], "length")]
    assert executor.plans == [{"p#0": 10}, {"p#0": 1, "p#1": 2}, {"p#0": 1, "p#1": 1}, {"p#1": 1}]
    (sibling,) = executor.scheduler_outputs[1].new_requests
    assert (sibling.request_id, sibling.num_computed_tokens, sibling.block_ids) == ("p#1", 8, [0, 1, 3])
    assert output.num_cached_tokens == 8
    stats = engine.get_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (20, 8)


# -- (c) stop strings -----------------------------------------------------------------------

def test_stop_string_ends_the_text_and_the_frontend_aborts_the_core_request(tiny_tokenizer):
    # "hello world": he, l, l, o, " w", or, l, d; the stop string " wor" is complete at the 6th token.
    engine, executor, _ = make_engine(tiny_tokenizer, next_token={"s": [286, 80, 80, 83, 321, 446, 80, 72]})
    engine.add_request("s", "the cat", SamplingParams(stop=" wor", max_tokens=12), arrival_time=0.0)
    for _ in range(5):
        assert engine.step()[0].finished is False
    (output,) = engine.step()
    completion = output.outputs[0]
    assert (output.finished, completion.text, completion.token_ids) == (True, "hello", [286, 80, 80, 83, 321, 446])
    assert (completion.finish_reason, completion.stop_reason) == ("stop", " wor")
    core = engine.engine_core
    assert core.scheduler.requests == {} and core.scheduler.kv_cache.num_free_blocks == 64
    assert list(executor.requests) == ["s"]  # the runner learns on the next step
    assert engine.step() == []
    assert executor.scheduler_outputs[-1] == SchedulerOutput(finished_request_ids=["s"])
    assert executor.requests == {}


# -- (d) aborts -----------------------------------------------------------------------------

def test_abort_frees_blocks_at_once_and_the_runner_forgets_on_the_next_step(tiny_tokenizer):
    engine, executor, _ = make_engine(tiny_tokenizer, max_num_seqs=1)
    engine.add_request("running", list(range(10, 19)), SamplingParams(max_tokens=8), arrival_time=0.0)
    engine.add_request("waiting", list(range(30, 35)), SamplingParams(max_tokens=8), arrival_time=0.0)
    engine.step()
    kv_cache = engine.engine_core.scheduler.kv_cache
    assert kv_cache.get_block_table("running") == [0, 1, 2]
    engine.abort_request(["running", "waiting"])
    assert kv_cache.num_free_blocks == 64 and kv_cache.block_tables == {}
    assert not engine.has_unfinished_requests()
    assert engine.step() == []
    # Only the request the runner held is named; the waiting one never reached it.
    assert executor.scheduler_outputs[-1] == SchedulerOutput(finished_request_ids=["running"])
    assert executor.requests == {}


# -- (e) EOS, stop tokens, max_tokens, min_tokens, the context length -----------------------

@pytest.mark.parametrize("script, params, tokens, finish", [
    ([10, 11, EOS, 12], {}, [10, 11, EOS], ("stop", None)),
    ([10, 11, EOS, 12], {"ignore_eos": True}, [10, 11, EOS, 12], ("length", None)),
    ([10, 11, 12], {"stop_token_ids": [11]}, [10, 11], ("stop", 11)),
    ([10, 11, 12, 13], {}, [10, 11, 12, 13], ("length", None)),
    # EOS and stop tokens before min_tokens are ordinary tokens.
    ([EOS, 11, 12, EOS], {"min_tokens": 3}, [EOS, 11, 12, EOS], ("stop", None)),
    ([11, 11, 11, 13], {"min_tokens": 3, "stop_token_ids": [11]}, [11, 11, 11], ("stop", 11)),
])
def test_the_core_stops_a_request_at_the_first_token_that_ends_it(script, params, tokens, finish):
    core, _, _ = make_core(next_token={"r": script})
    core.add_requests([core_request("r", [5, 6, 7], max_tokens=4, **params)])
    assert run_core(core) == ({"r": tokens}, {"r": finish})
    assert core.scheduler.kv_cache.num_free_blocks == 64


def test_a_request_stops_at_the_context_length():
    core, _, _ = make_core(max_model_len=8)
    core.add_requests([core_request("r", [5, 6, 7, 8, 9, 10], max_tokens=16)])
    # (10 * 7 + 6) % 512 = 76, then (76 * 7 + 7) % 512 = 27: 8 tokens in all.
    assert run_core(core) == ({"r": [76, 27]}, {"r": ("length", None)})


def test_eos_stays_in_the_token_ids_but_not_in_the_text(tiny_tokenizer):
    engine, _, _ = make_engine(tiny_tokenizer, next_token={"r": [280, 370, EOS]})
    engine.add_request("r", "the", SamplingParams(max_tokens=8), arrival_time=0.0)
    completion = run_engine(engine)["r"].outputs[0]
    assert (completion.text, completion.token_ids, completion.finish_reason) == (" cat", [280, 370, EOS], "stop")


def test_fake_logprobs_reach_the_output_with_their_decoded_tokens(tiny_tokenizer):
    engine, _, _ = make_engine(tiny_tokenizer, next_token={"r": [280, 370]})
    engine.add_request("r", "the", SamplingParams(max_tokens=2, logprobs=2), arrival_time=0.0)
    completion = run_engine(engine)["r"].outputs[0]
    assert completion.logprobs == [{280: Logprob(-1.0, 1, " c"), 281: Logprob(-2.0, 2, " k")},
                                   {370: Logprob(-1.0, 1, "at"), 371: Logprob(-2.0, 2, "ouck")}]
    assert completion.cumulative_logprob == -2.0


# -- (f) the virtual clock ------------------------------------------------------------------

def test_request_metrics_are_exact_virtual_times(tiny_tokenizer):
    # Each step costs 1 s + 1 s per token; one request runs at a time.
    engine, _, clock = make_engine(tiny_tokenizer, max_num_seqs=1,
                                   step_time_s=lambda num_tokens, num_requests: 1.0 + num_tokens)
    engine.add_request("a", list(range(10, 16)), SamplingParams(max_tokens=2), arrival_time=0.0)
    engine.step()                                # a's prompt: 0 -> 7 s
    engine.add_request("b", list(range(20, 24)), SamplingParams(max_tokens=1))  # arrives now: the engine's clock
    (a,) = engine.step()                         # a's decode: 7 -> 9 s; b waits for the one seat
    (b,) = engine.step()                         # b's prompt: 9 -> 14 s
    assert a.metrics == RequestMetrics(arrival_time=0.0, first_scheduled_time=0.0, first_token_time=7.0,
                                       finished_time=9.0, num_prompt_tokens=6)
    assert b.metrics == RequestMetrics(arrival_time=7.0, first_scheduled_time=9.0, first_token_time=14.0,
                                       finished_time=14.0, num_prompt_tokens=4)
    assert (b.metrics.ttft_s, b.metrics.e2e_latency_s) == (7.0, 7.0)


def test_the_default_cost_model_is_1_ms_a_step_and_0_1_ms_a_token():
    core, _, clock = make_core()
    core.add_requests([core_request("r", range(10, 16), max_tokens=2)])
    core.step()
    assert clock.now() == pytest.approx(0.0016)
    core.step()
    assert clock.now() == pytest.approx(0.0027)
    core.step()  # nothing to run: time does not move
    assert clock.now() == pytest.approx(0.0027)


# -- (g) KV events --------------------------------------------------------------------------

def test_kv_events_name_the_stored_and_evicted_blocks_in_order():
    core, _, _ = make_core(num_blocks=4)
    prompt = list(range(20, 29))  # 9 tokens; it draws (28 * 7 + 9) % 512 = 205, then 421, 398, 238
    core.add_requests([core_request("a", prompt, max_tokens=4)])
    h0 = hash_block(None, [20, 21, 22, 23])
    h1 = hash_block(h0, [24, 25, 26, 27])
    h2 = hash_block(h1, [28, 205, 421, 398])
    assert core.step().kv_events == [BlockStored([h0], [0], None), BlockStored([h1], [1], h0)]
    assert core.step().kv_events == []
    assert core.step().kv_events == []
    last = core.step()
    assert last.outputs[0].new_token_ids == [238] and last.outputs[0].finish_reason == "length"
    assert last.kv_events == [BlockStored([h2], [2], h1)]
    # a's blocks are free (queue 3, 2, 1, 0) but still cached; b's prompt takes 3, 2, 1 and evicts 2 and 1.
    core.add_requests([core_request("b", range(40, 49), max_tokens=1)])
    g0 = hash_block(None, [40, 41, 42, 43])
    g1 = hash_block(g0, [44, 45, 46, 47])
    assert core.step().kv_events == [BlockRemoved([h2]), BlockRemoved([h1]),
                                     BlockStored([g0], [3], None), BlockStored([g1], [2], g0)]


# -- (h) policies ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy, order", [("fcfs", ["low", "high"]), ("priority", ["high", "low"])])
def test_the_policy_decides_which_waiting_request_starts_first(policy, order):
    core, executor, _ = make_core(policy=policy, max_num_seqs=1)
    core.add_requests([core_request("low", range(10, 14), max_tokens=1, priority=5)])
    core.add_requests([core_request("high", range(20, 24), max_tokens=1, priority=0)])
    run_core(core)
    assert executor.plans == [{order[0]: 4}, {order[1]: 4}]



def test_a_running_request_that_is_its_own_victim_frees_room_for_the_others_in_the_same_step():
    # 4 blocks of 4. "lazy" (7 tokens, priority 5) runs first; "urgent" (8 tokens) then fills the pool.
    core, executor, _ = make_core(num_blocks=4, policy="priority")
    core.add_requests([core_request("lazy", range(10, 17), max_tokens=3, priority=5)])
    core.step()
    core.add_requests([core_request("urgent", range(20, 28), max_tokens=3, priority=0)])
    core.step()
    assert core.scheduler.kv_cache.block_tables == {"lazy": [0, 1], "urgent": [2, 3]}
    # Both need a 3rd block. lazy is first in the running list but the lowest priority: it is preempted,
    # and urgent decodes in the same step in lazy's freed tail block; the runner hears of both at once.
    core.step()
    assert executor.scheduler_outputs[-1].preempted_request_ids == ["lazy"]
    assert executor.scheduler_outputs[-1].num_scheduled_tokens == {"urgent": 1}
    assert core.scheduler.kv_cache.block_tables == {"urgent": [2, 3, 1]}
    run_core(core)
    # lazy comes back with its 2 tokens (9 in all), its first block still cached.
    assert executor.plans == [{"lazy": 7}, {"lazy": 1, "urgent": 8}, {"urgent": 1}, {"urgent": 1}, {"lazy": 5}]
    assert len(executor.scheduler_outputs) == 5


def test_a_step_that_only_preempts_still_reaches_the_runner():
    # A request that outgrows the whole pool: the core refuses one, so it goes to the scheduler directly.
    core, executor, _ = make_core(num_blocks=2)
    core.scheduler.add_request(Request("r", list(range(10, 18)), SamplingParams(max_tokens=3), arrival_time=0.0,
                                       max_tokens=3))
    core.step()
    assert core.step().outputs == []
    assert executor.scheduler_outputs[-1] == SchedulerOutput(preempted_request_ids=["r"])
    assert executor.requests["r"].block_table == []

# -- (i) admission limits ---------------------------------------------------------------------

def test_the_core_refuses_a_request_that_could_never_fit_its_pool():
    # On CUDA the frontend does not know the pool's size (the runner profiles it): the core checks.
    core, _, _ = make_core(num_blocks=2)  # 2 blocks of 4 tokens
    with pytest.raises(ValueError, match=r"^request needs up to 11 tokens of KV cache, but the whole cache "
                                         r"holds 8$"):
        core.add_requests([core_request("r", range(10, 18), max_tokens=3)])
    assert core.scheduler.requests == {}
    core.add_requests([core_request("r", range(10, 17), max_tokens=1)])  # 8 tokens fit
    assert list(core.scheduler.requests) == ["r"]

def test_a_group_past_the_waiting_request_limit_is_refused_whole(tiny_tokenizer):
    engine, _, _ = make_engine(tiny_tokenizer, max_waiting_requests=2)
    with pytest.raises(QueueFullError, match=r"^the waiting queue is full \(2 requests\)$"):
        engine.add_request("p", list(range(10, 14)), SamplingParams(n=3), arrival_time=0.0)
    assert engine.engine_core.scheduler.requests == {}
    assert not engine.has_unfinished_requests()
    engine.add_request("p", list(range(10, 14)), SamplingParams(n=2), arrival_time=0.0)  # the id is free
    assert list(engine.engine_core.scheduler.requests) == ["p#0", "p#1"]


def test_a_prompt_past_the_waiting_token_limit_is_refused_while_others_wait(tiny_tokenizer):
    engine, _, _ = make_engine(tiny_tokenizer, max_waiting_tokens=15)
    engine.add_request("a", list(range(10, 20)), SamplingParams(), arrival_time=0.0)
    with pytest.raises(QueueFullError, match=r"^the waiting queue is full \(10 tokens wait to be computed, "
                                             r"10 more would pass the limit of 15\)$"):
        engine.add_request("b", list(range(30, 40)), SamplingParams(), arrival_time=0.0)
    assert list(engine.engine_core.scheduler.requests) == ["a"]
    assert not engine.output_processor.has_request("b")


def test_a_duplicate_core_request_id_is_refused_with_nothing_queued():
    core, _, _ = make_core()
    core.add_requests([core_request("a", [5, 6], max_tokens=1)])
    with pytest.raises(ValueError, match="request id 'a' is already in use"):
        core.add_requests([core_request("b", [5, 6], max_tokens=1), core_request("a", [7], max_tokens=1)])
    assert list(core.scheduler.requests) == ["a"]
