"""The runner's request copies and the flattened batch: update_states, batch_order, prepare_inputs (exact values)."""

import numpy as np
import pytest

from splitfuse.sampling_params import SamplingParams
from splitfuse.step import CachedRequestData, NewRequestData, SchedulerOutput
from splitfuse.worker.input_batch import RequestState, batch_order, prepare_inputs, update_states

PARAMS = SamplingParams()


def state(request_id, prompt, output=(), block_table=(), num_computed_tokens=0):
    return RequestState(request_id, list(prompt), list(output), PARAMS, list(block_table), num_computed_tokens)


# -- prepare_inputs -------------------------------------------------------------------------

# block_size 4. The decode has 10 known tokens and computes its last (position 9, in its 3rd block);
# the chunk's prompt is 16 tokens, of which 8 (2 blocks) were prefix-cache hits, and this step computes
# 5 more (positions 8..12, so a 4th block); the fresh prompt computes all its 3 tokens.
DECODE = state("decode", range(100, 108), output=[108, 109], block_table=[3, 7, 2], num_computed_tokens=9)
CHUNK = state("chunk", range(200, 216), block_table=[0, 1, 5, 6], num_computed_tokens=8)
FRESH = state("fresh", [300, 301, 302], block_table=[4])


def test_batch_order_puts_the_decode_first_and_keeps_the_rest_in_order():
    assert batch_order([CHUNK, DECODE, FRESH], [5, 1, 3]) == [1, 0, 2]


def test_prepare_inputs_on_a_ragged_batch_with_a_prefix_hit_and_a_chunk():
    token_ids, positions, layout = prepare_inputs([DECODE, CHUNK, FRESH], np.array([1, 5, 3]), block_size=4)
    assert token_ids == [109, 208, 209, 210, 211, 212, 300, 301, 302]
    assert positions.tolist() == [9, 8, 9, 10, 11, 12, 0, 1, 2]
    assert layout.query_start_loc.tolist() == [0, 1, 6, 9]
    assert layout.context_lens.tolist() == [10, 13, 3]
    assert layout.query_lens.tolist() == [1, 5, 3]
    assert layout.block_tables.tolist() == [[3, 7, 2, 0], [0, 1, 5, 6], [4, 0, 0, 0]]
    # position 9 -> block 2 (table[2] = 2) -> 2 * 4 + 1; positions 8..11 -> block 5; 12 -> block 6; 0..2 -> block 4
    assert layout.slot_mapping.tolist() == [9, 20, 21, 22, 23, 24, 16, 17, 18]
    assert layout.num_decodes == 1
    assert layout.block_size == 4


def test_batch_order_sorts_decodes_by_context_and_keeps_chunks_in_the_given_order():
    states = [state(f"r{i}", [1], num_computed_tokens=n) for i, n in enumerate([30, 0, 12, 5, 7])]
    assert batch_order(states, [1, 4, 1, 6, 1]) == [4, 2, 0, 1, 3]


# -- update_states ----------------------------------------------------------------------------

def new_request(request_id, prompt, output=(), block_ids=(0,), num_computed_tokens=0, seed=None):
    return NewRequestData(request_id, list(prompt), list(output), PARAMS, list(block_ids), num_computed_tokens, seed)


def test_new_request_becomes_a_state_with_its_own_lists():
    data = new_request("a", [5, 6, 7], block_ids=[2, 3], num_computed_tokens=0)
    requests = {}
    update_states(requests, SchedulerOutput(new_requests=[data]))
    assert requests == {"a": state("a", [5, 6, 7], block_table=[2, 3])}
    assert requests["a"].all_token_ids == [5, 6, 7]
    data.block_ids.append(9)  # the message may be reused by its sender: the runner copied it
    assert requests["a"].block_table == [2, 3]


def test_cached_diff_appends_tokens_and_blocks_and_sets_the_computed_count():
    requests = {}
    update_states(requests, SchedulerOutput(new_requests=[new_request("a", [5, 6, 7], block_ids=[2])]))
    update_states(requests, SchedulerOutput(cached_requests=[CachedRequestData("a", [8], [4], 3)]))
    assert requests["a"] == state("a", [5, 6, 7], output=[8], block_table=[2, 4], num_computed_tokens=3)
    assert requests["a"].all_token_ids == [5, 6, 7, 8]


def test_diff_for_a_request_the_runner_does_not_hold_raises():
    with pytest.raises(ValueError, match="the scheduler sent a diff for 'ghost', which the runner does not hold"):
        update_states({}, SchedulerOutput(cached_requests=[CachedRequestData("ghost", [1], [], 1)]))


def test_preempted_request_drops_its_blocks_keeps_its_generator_and_resumes_whole():
    requests = {}
    update_states(requests, SchedulerOutput(new_requests=[new_request("a", [5, 6], block_ids=[1], seed=42)]))
    generator = requests["a"].generator
    assert generator.initial_seed() == 42
    update_states(requests, SchedulerOutput(preempted_request_ids=["a"]))
    assert requests["a"].block_table == [] and requests["a"].generator is generator
    # It comes back with its generated tokens, to recompute (its seed is not applied again).
    update_states(requests, SchedulerOutput(new_requests=[
        new_request("a", [5, 6], output=[9], block_ids=[3], num_computed_tokens=0, seed=42)]))
    assert requests["a"].all_token_ids == [5, 6, 9]
    assert requests["a"].block_table == [3]
    assert requests["a"].generator is generator


def test_finished_requests_are_forgotten_before_new_ones_are_added():
    requests = {}
    update_states(requests, SchedulerOutput(new_requests=[new_request("a", [5]), new_request("b", [6])]))
    # "a" finished and its id was reused by a new request in the same step: the new one must survive.
    update_states(requests, SchedulerOutput(new_requests=[new_request("a", [7], block_ids=[4])],
                                            finished_request_ids=["a", "never-seen"]))
    assert requests == {"a": state("a", [7], block_table=[4]), "b": state("b", [6], block_table=[0])}


def test_unseeded_request_has_no_generator_of_its_own():
    requests = {}
    update_states(requests, SchedulerOutput(new_requests=[new_request("a", [5])]))
    assert requests["a"].generator is None
