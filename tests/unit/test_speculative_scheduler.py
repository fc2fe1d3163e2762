"""Speculative decoding's scheduler half: n-gram drafts, their budget, and what a rejection rolls back."""

from __future__ import annotations

from splitfuse.config import SchedulerConfig
from splitfuse.engine.kv_cache import KVCacheManager
from splitfuse.engine.request import Request
from splitfuse.engine.scheduler import Scheduler
from splitfuse.engine.speculative import ngram_draft
from splitfuse.sampling_params import SamplingParams
from splitfuse.step import ModelRunnerOutput


def test_ngram_draft_follows_the_latest_earlier_occurrence_of_the_longest_suffix():
    assert ngram_draft([5, 6, 7, 9, 5, 6], 3, n_max=4, n_min=2) == [7, 9, 5]
    # "1 2" occurs twice before the end; the latest occurrence wins.
    assert ngram_draft([1, 2, 3, 1, 2, 4, 8, 1, 2], 2, n_max=2, n_min=2) == [4, 8]
    # The longest matching suffix wins over a later, shorter one.
    assert ngram_draft([7, 8, 9, 1, 9, 3, 7, 8, 9], 1, n_max=3, n_min=1) == [1]
    assert ngram_draft([1, 2, 3, 4], 3, n_max=3, n_min=1) == []  # nothing repeats
    assert ngram_draft([4, 4], 5, n_max=3, n_min=1) == [4]  # the continuation ends where the tokens do
    # Byte matches that straddle token boundaries are not token matches: 256 = 00 01 00 00, 1 = 01 00 00 00.
    assert ngram_draft([0x100, 1, 0, 7, 1], 1, n_max=1, n_min=1) == [0]


def make(budget=16, max_batch=8, num_blocks=64):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, speculative_method="ngram",
                             num_speculative_tokens=4, speculative_max_batch=max_batch)
    return Scheduler(config, KVCacheManager(num_blocks, 4, True))


def add(scheduler, request_id, prompt, max_tokens=20):
    request = Request(request_id, prompt, SamplingParams(temperature=0), arrival_time=0.0, max_tokens=max_tokens,
                      arrival_order=len(scheduler.requests))
    scheduler.add_request(request)
    return request


def test_drafts_cost_budget_and_a_rejection_rolls_back_what_counts_as_computed():
    scheduler = make()
    request = add(scheduler, "a", [1, 2, 3, 4, 5, 1, 2, 3])
    output = scheduler.schedule()  # the prompt: no drafts yet
    assert output.num_scheduled_tokens == {"a": 8} and output.spec_token_ids == {}
    scheduler.update_from_output(output, ModelRunnerOutput(["a"], [[4]]))
    # Known: ... 1 2 3 4. "2 3 4" occurred: drafts 5 1 2 3 after the last known token.
    output = scheduler.schedule()
    assert output.spec_token_ids == {"a": [5, 1, 2, 3]}
    assert output.num_scheduled_tokens == {"a": 5} and output.sampling_request_ids == ["a"]
    # The runner kept two drafts (5, 1) and drew 9 after them: three tokens; drafts 2 and 3 were rejected.
    scheduler.update_from_output(output, ModelRunnerOutput(["a"], [[5, 1, 9]]))
    assert request.output_token_ids == [4, 5, 1, 9]
    assert (request.num_tokens, request.num_computed_tokens) == (12, 11)  # all but the last drawn token
    # Blocks of 4: the first two (tokens 0-7) are cached; tokens 8-10 are computed, the block is not full.
    assert len(scheduler.kv_cache._num_cached_blocks) == 1 and scheduler.kv_cache._num_cached_blocks["a"] == 2
    assert scheduler.speculator.stats.draft_tokens == 4 and scheduler.speculator.stats.accepted_tokens == 2
    assert request.spec_acceptance == 0.7 + 0.3 * 0.5


def test_drafts_fit_the_budget_and_max_tokens_and_stop_in_a_big_batch():
    scheduler = make(budget=11)
    first = add(scheduler, "a", [1, 2, 3, 1, 2, 3, 1, 2], max_tokens=3)
    add(scheduler, "b", [7, 8])
    output = scheduler.schedule()
    scheduler.update_from_output(output, ModelRunnerOutput(["a", "b"], [[3], [9]]))
    output = scheduler.schedule()
    # "a" may still write 2 tokens: 1 draft at most (max_tokens 3, one output so far, one drawn after the drafts).
    assert output.spec_token_ids == {"a": [1]} and output.num_scheduled_tokens == {"a": 2, "b": 1}
    scheduler.update_from_output(output, ModelRunnerOutput(["a", "b"], [[1, 2], [9]]))
    assert first.is_finished and first.output_token_ids == [3, 1, 2]

    crowded = make(max_batch=1)
    add(crowded, "a", [1, 2, 3, 1, 2, 3, 1, 2])
    add(crowded, "b", [1, 2, 3, 1, 2, 3, 1, 2])
    output = crowded.schedule()
    crowded.update_from_output(output, ModelRunnerOutput(["a", "b"], [[3], [3]]))
    assert crowded.schedule().spec_token_ids == {}  # two running: more than speculative_max_batch


def test_drafts_never_preempt_a_request():
    scheduler = make(num_blocks=4)  # blocks of 4
    first = add(scheduler, "a", [1, 2, 3, 1, 2, 3])  # 2 blocks: room up to position 7
    add(scheduler, "b", [5, 6, 7, 8, 5, 6, 7])  # 2 blocks: the pool is full
    output = scheduler.schedule()
    scheduler.update_from_output(output, ModelRunnerOutput(["a", "b"], [[1], [5]]))
    # "a" decodes at position 6 (its block has room); drafts 2 3 1 would need a third block: none is free,
    # and drafts never take one from "b".
    assert first.num_tokens == 7
    output = scheduler.schedule()
    assert output.preempted_request_ids == [] and output.spec_token_ids == {}
    assert output.num_scheduled_tokens == {"a": 1, "b": 1}


def test_with_a_draft_model_the_scheduler_sends_only_how_many_drafts_and_rolls_back_the_rejected():
    config = SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8, speculative_method="draft",
                             speculative_model="unused", num_speculative_tokens=3)
    scheduler = Scheduler(config, KVCacheManager(64, 4, True))
    request = add(scheduler, "a", [9, 8, 7, 6, 5])  # nothing repeats: an n-gram proposer would find no draft
    output = scheduler.schedule()
    assert output.num_scheduled_tokens == {"a": 5} and output.spec_num_drafts == {}
    scheduler.update_from_output(output, ModelRunnerOutput(["a"], [[4]]))
    output = scheduler.schedule()
    assert output.spec_num_drafts == {"a": 3} and output.spec_token_ids == {}
    assert output.num_scheduled_tokens == {"a": 4} and output.sampling_request_ids == ["a"]
    assert len(scheduler.kv_cache.get_block_table("a")) == 3  # room for positions 0..8: 6 known + 3 drafts
    # The runner's draft model proposed three; one stood, and the target drew 3 after it.
    scheduler.update_from_output(output, ModelRunnerOutput(["a"], [[2, 3]]))
    assert request.output_token_ids == [4, 2, 3] and request.num_computed_tokens == 7
    assert scheduler.speculator.stats.draft_tokens == 3 and scheduler.speculator.stats.accepted_tokens == 1


def test_a_draft_method_needs_its_model_and_a_model_needs_the_draft_method():
    import pytest

    with pytest.raises(ValueError, match="speculative_method draft and speculative_model go together"):
        SchedulerConfig(speculative_method="draft")
    with pytest.raises(ValueError, match="speculative_method draft and speculative_model go together"):
        SchedulerConfig(speculative_method="ngram", speculative_model="/some/dir")
