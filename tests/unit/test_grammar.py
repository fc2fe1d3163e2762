"""Structured output's parts: the bitmask layout, the sampler's masking on every path, and the scheduler
holding a request back (and only it) while its grammar compiles."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from splitfuse.config import SchedulerConfig
from splitfuse.engine.kv_cache import KVCacheManager
from splitfuse.engine.request import Request
from splitfuse.engine.scheduler import Scheduler
from splitfuse.sample.grammar import GrammarCompiler, bitmask_words, disallowed_tokens
from splitfuse.sample.sampler import GrammarMasks, Sampler, SamplingRow
from splitfuse.sampling_params import SamplingParams, StructuredOutputsParams
from splitfuse.step import ModelRunnerOutput


def test_bit_t_mod_32_of_word_t_div_32_allows_token_t():
    bitmask = np.zeros((2, bitmask_words(40)), dtype=np.int32)
    assert bitmask.shape == (2, 2)
    bitmask[0, 0] = (1 << 0) | (1 << 5)
    bitmask[0, 1] = 1 << 7  # token 39
    bitmask[1, 0] = np.int32(-(1 << 31))  # bit 31: token 31
    disallowed = disallowed_tokens(bitmask, 40)
    assert disallowed.shape == (2, 40) and disallowed.dtype == np.bool_
    assert np.flatnonzero(~disallowed[0]).tolist() == [0, 5, 39]
    assert np.flatnonzero(~disallowed[1]).tolist() == [31]


def masks(allowed_by_row: dict[int, list[int]], vocab_size: int = 10) -> GrammarMasks:
    disallowed = torch.ones(len(allowed_by_row), vocab_size, dtype=torch.bool)
    for j, allowed in enumerate(allowed_by_row.values()):
        disallowed[j, allowed] = False
    return GrammarMasks(list(allowed_by_row), disallowed)


def row(**params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), [1], [])


def test_the_mask_is_applied_on_the_greedy_fast_path_the_sampling_path_and_mixed_batches():
    sampler = Sampler(vocab_size=10, eos_token_ids=[0])
    logits = torch.arange(10, dtype=torch.float32).repeat(3, 1)  # token 9 is everyone's favourite
    # All greedy (the fast path): masked rows take their best allowed token, the free row 9.
    out = sampler(logits.clone(), [row(temperature=0), row(temperature=0), row(temperature=0)],
                  masks({0: [2, 4], 2: [7]}))
    assert out.token_ids == [4, 9, 7]
    # Every row sampled (temperature 1) and constrained: only allowed tokens are ever drawn.
    draws = {tuple(sampler(logits[:2].clone(), [row(), row()], masks({0: [3, 5], 1: [8]})).token_ids)
             for _ in range(50)}
    assert draws == {(3, 8), (5, 8)}
    # Mixed greedy and sampled rows, with logprobs: they see the mask too (-inf outside it).
    out = sampler(logits.clone(), [row(logprobs=1), row(temperature=0), row(temperature=0, logprobs=1)],
                  masks({0: [1], 2: [6]}))
    assert out.token_ids == [1, 9, 6]
    assert out.logprobs[0][0] == pytest.approx(0.0) and out.logprobs[2][0] == pytest.approx(0.0)


def test_bf16_logits_are_masked_in_place_too():
    sampler = Sampler(vocab_size=10, eos_token_ids=[0])
    logits = torch.arange(10, dtype=torch.bfloat16).repeat(2, 1)
    assert sampler(logits, [row(temperature=0), row(temperature=0)], masks({1: [0, 3]})).token_ids == [9, 3]
    assert logits[1].tolist() == [0.0, float("-inf"), float("-inf"), 3.0] + [float("-inf")] * 6


@pytest.fixture
def compiler(tiny_tokenizer):
    compiler = GrammarCompiler(tiny_tokenizer, len(tiny_tokenizer), [tiny_tokenizer.eos_token_id or 0])
    yield compiler
    compiler.shutdown()


def test_a_request_waits_for_its_grammar_while_others_run_then_samples_under_its_mask(compiler, tiny_tokenizer):
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), KVCacheManager(32, 4, True),
                          grammar_compiler=compiler)
    gate = threading.Event()
    compiler._pool.submit(gate.wait)  # the compile thread is busy: the grammar's compile queues behind this
    choice = StructuredOutputsParams(choice=["yes", "no"])
    constrained = Request("c", [5, 6, 7], SamplingParams(structured_outputs=choice), arrival_time=0.0, max_tokens=4)
    free = Request("f", [5, 6, 7], SamplingParams(), arrival_time=0.0, max_tokens=4, arrival_order=1)
    scheduler.add_request(constrained)
    scheduler.add_request(free)
    output = scheduler.schedule()
    assert list(output.num_scheduled_tokens) == ["f"] and output.grammar_request_ids == []
    scheduler.update_from_output(output, ModelRunnerOutput(["f"], [[9]]))

    gate.set()
    constrained.grammar_future.result(timeout=30)
    output = scheduler.schedule()
    assert output.num_scheduled_tokens == {"f": 1, "c": 3}
    assert output.grammar_request_ids == ["c"]
    bitmask = np.frombuffer(output.grammar_bitmask, dtype=np.int32).reshape(1, -1)
    allowed = np.flatnonzero(~disallowed_tokens(bitmask, len(tiny_tokenizer))[0]).tolist()
    # Exactly the tokens that begin "yes" or "no" (and are then completable to one of them).
    texts = {t: tiny_tokenizer.decode([t]) for t in allowed}
    assert allowed and all("yes".startswith(text) or "no".startswith(text) for text in texts.values()), texts
    first = tiny_tokenizer.encode("yes", add_special_tokens=False)[0]
    assert first in allowed
    scheduler.update_from_output(output, ModelRunnerOutput(["f", "c"], [[9], [first]]))
    assert constrained.output_token_ids == [first] and compiler.num_compiled == 1


def test_a_grammar_that_fails_to_compile_ends_its_request_with_abort(compiler):
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), KVCacheManager(32, 4, True),
                          grammar_compiler=compiler)
    # The frontend's check would refuse this; the core must still end it cleanly, not crash or hang.
    broken = StructuredOutputsParams(grammar="start: missing_rule")
    request = Request("b", [5, 6], SamplingParams(structured_outputs=broken), arrival_time=0.0, max_tokens=4)
    scheduler.add_request(request)
    request.grammar_future.exception(timeout=30)
    assert scheduler.schedule().is_empty
    assert [(o.request_id, o.finish_reason) for o in scheduler.take_grammar_failures()] == [("b", "abort")]
    assert not scheduler.has_unfinished_requests() and scheduler.kv_cache.num_free_blocks == 32


def test_an_engine_without_a_tokenizer_refuses_structured_output():
    scheduler = Scheduler(SchedulerConfig(), KVCacheManager(8, 4, True))
    request = Request("x", [1], SamplingParams(structured_outputs=StructuredOutputsParams(regex="a")),
                      arrival_time=0.0, max_tokens=2)
    with pytest.raises(ValueError, match="structured output needs an engine with a tokenizer"):
        scheduler.add_request(request)
    assert not scheduler.has_unfinished_requests()


def test_a_request_with_drafts_gets_a_mask_row_per_position_in_order():
    from splitfuse.step import SchedulerOutput
    from splitfuse.worker.model_runner import grammar_masks

    bitmask = np.zeros((4, 1), dtype=np.int32)
    bitmask[:, 0] = [1 << 1, 1 << 2, 1 << 3, 1 << 4]  # row k allows token k + 1 only
    output = SchedulerOutput(grammar_request_ids=["a", "b", "a", "a"], grammar_bitmask=bitmask.tobytes())
    masks = grammar_masks(output, {"a": 0, "b": 3}, vocab_size=8)
    assert masks.rows == [0, 3, 1, 2]  # "a" samples at logit rows 0-2 (two drafts), "b" at row 3
    assert [np.flatnonzero(~row.numpy()).tolist() for row in masks.disallowed] == [[1], [2], [3], [4]]
