"""FakeExecutor on hand-written SchedulerOutputs: its token rule, scripts, fake logprobs, cost model and step checks."""

import pytest

from splitfuse.clock import VirtualClock
from splitfuse.sampling_params import SamplingParams
from splitfuse.step import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from splitfuse.worker.fake_executor import FakeExecutor, default_next_token


def new(request_id, prompt, block_ids=(0,), num_computed_tokens=0, output=(), **params):
    return NewRequestData(request_id, list(prompt), list(output), SamplingParams(**params), list(block_ids),
                          num_computed_tokens)


def prefill(request_id, prompt, **kwargs):
    """The step that admits a request and computes its whole prompt."""
    return SchedulerOutput(new_requests=[new(request_id, prompt, **kwargs)],
                           num_scheduled_tokens={request_id: len(prompt)}, sampling_request_ids=[request_id])


def test_the_default_rule_is_the_documented_worked_example():
    assert default_next_token([5, 6, 7], 512) == 52
    executor = FakeExecutor(VirtualClock())
    assert executor.execute_model(prefill("a", [5, 6, 7])) == ModelRunnerOutput(["a"], [[52]], [None])
    # Step 2: the scheduler accepted 52; the rule now sees [5, 6, 7, 52]: (52 * 7 + 4) % 512 = 368.
    step = SchedulerOutput(cached_requests=[CachedRequestData("a", [52], [], 3)], num_scheduled_tokens={"a": 1},
                           sampling_request_ids=["a"])
    assert executor.execute_model(step).sampled_token_ids == [[368]]
    assert executor.plans == [{"a": 3}, {"a": 1}]
    assert executor.requests["a"].all_token_ids == [5, 6, 7, 52]


def test_a_chunk_that_does_not_finish_the_prompt_samples_nothing_and_costs_time():
    clock = VirtualClock()
    executor = FakeExecutor(clock, step_time_s=lambda num_tokens, num_requests: 10.0 * num_requests + num_tokens)
    step = SchedulerOutput(new_requests=[new("a", range(8), block_ids=[0, 1])], num_scheduled_tokens={"a": 5})
    assert executor.execute_model(step) == ModelRunnerOutput()
    assert clock.now() == 15.0


def test_a_script_gives_each_request_its_tokens_in_order_and_runs_out_loudly():
    executor = FakeExecutor(VirtualClock(), next_token={"a": [40]})
    assert executor.execute_model(prefill("a", [5, 6])).sampled_token_ids == [[40]]
    step = SchedulerOutput(cached_requests=[CachedRequestData("a", [40], [], 2)], num_scheduled_tokens={"a": 1},
                           sampling_request_ids=["a"])
    with pytest.raises(RuntimeError, match="'a' samples its output token 1, but its script has 1"):
        executor.execute_model(step)
    with pytest.raises(RuntimeError, match="'b' samples its output token 0, but its script has 0"):
        FakeExecutor(VirtualClock(), next_token={"a": [40]}).execute_model(prefill("b", [5]))


def test_a_request_that_asks_for_logprobs_gets_the_fixed_fake_values():
    executor = FakeExecutor(VirtualClock(), next_token={"a": [510]})
    output = executor.execute_model(prefill("a", [5, 6], logprobs=3))
    assert output.logprobs == [[(-1.0, 1, [510, 511, 0], [-1.0, -2.0, -3.0])]]


def test_an_empty_step_only_forgets_finished_requests():
    clock = VirtualClock()
    executor = FakeExecutor(clock)
    executor.execute_model(prefill("a", [5, 6]))
    now = clock.now()
    assert executor.execute_model(SchedulerOutput(finished_request_ids=["a"])) == ModelRunnerOutput()
    assert executor.requests == {} and clock.now() == now
    assert executor.plans == [{"a": 2}]


# -- steps the real runner could not run ------------------------------------------------------

def test_scheduling_a_request_the_runner_does_not_hold_raises():
    executor = FakeExecutor(VirtualClock())
    with pytest.raises(RuntimeError, match="step schedules 'ghost', which the runner does not hold"):
        executor.execute_model(SchedulerOutput(num_scheduled_tokens={"ghost": 1}))


def test_scheduling_a_preempted_request_before_it_comes_back_whole_raises():
    executor = FakeExecutor(VirtualClock())
    executor.execute_model(prefill("a", [5, 6]))
    with pytest.raises(RuntimeError, match="step schedules 'a', which the runner does not hold"):
        executor.execute_model(SchedulerOutput(preempted_request_ids=["a"], num_scheduled_tokens={"a": 1}))


def test_a_diff_for_an_unknown_request_raises():
    with pytest.raises(RuntimeError, match="the scheduler sent a diff for 'ghost', which the runner does not hold"):
        FakeExecutor(VirtualClock()).execute_model(SchedulerOutput(
            cached_requests=[CachedRequestData("ghost", [], [], 0)], num_scheduled_tokens={"ghost": 1}))


def test_scheduling_tokens_the_runner_does_not_know_raises():
    step = SchedulerOutput(new_requests=[new("a", [5, 6, 7], num_computed_tokens=2)], num_scheduled_tokens={"a": 2},
                           sampling_request_ids=["a"])
    with pytest.raises(RuntimeError, match="step schedules 2 tokens of 'a' from 2 on, but the runner knows 3"):
        FakeExecutor(VirtualClock()).execute_model(step)


@pytest.mark.parametrize("sampling, named", [
    ([], r"\[\]"), (["a", "b"], r"\['a', 'b'\]"), (["a", "a"], r"\['a', 'a'\]")])
def test_sampling_requests_must_be_exactly_those_whose_tokens_are_all_computed(sampling, named):
    # a computes its whole prompt (it must sample); b computes 2 of its 4 tokens (it must not).
    step = SchedulerOutput(new_requests=[new("a", [5, 6]), new("b", [7, 8, 9, 10], block_ids=[1])],
                           num_scheduled_tokens={"a": 2, "b": 2}, sampling_request_ids=sampling)
    with pytest.raises(RuntimeError, match=rf"sampling requests {named} are not those whose known tokens are all "
                                           r"computed this step: \['a'\]"):
        FakeExecutor(VirtualClock()).execute_model(step)


def test_with_a_block_size_the_blocks_must_hold_the_computed_tokens():
    step = prefill("a", range(9), block_ids=[3, 4])
    with pytest.raises(RuntimeError, match=r"'a' computes up to token 9, but its blocks \[3, 4\] hold 8"):
        FakeExecutor(VirtualClock(), block_size=4).execute_model(step)
    FakeExecutor(VirtualClock()).execute_model(prefill("a", range(9), block_ids=[3, 4]))  # unchecked without one
