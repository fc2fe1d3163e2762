"""Scheduler with a fake model runner: the token budget, running-first order, chunking, limits, preemption."""

import pytest

from splitfuse.config import SchedulerConfig
from splitfuse.engine.kv_cache import KVCacheManager
from splitfuse.engine.request import Request, RequestStatus
from splitfuse.engine.scheduler import Scheduler
from splitfuse.sampling_params import SamplingParams
from splitfuse.step import ModelRunnerOutput

FAKE_TOKEN = 7


def make_scheduler(budget=8, max_num_seqs=4, num_blocks=64, block_size=4, caching=True):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs), kv)


def add(scheduler, request_id, num_prompt_tokens, max_tokens=4, order=None, priority=0, first_token=100):
    request = Request(request_id, list(range(first_token, first_token + num_prompt_tokens)), SamplingParams(),
                      arrival_time=0.0, max_tokens=max_tokens, priority=priority,
                      arrival_order=order if order is not None else len(scheduler.waiting) + len(scheduler.running))
    scheduler.add_request(request)
    return request


def fake_step(scheduler):
    """schedule -> (no forward) -> update; every sampling request draws FAKE_TOKEN. Returns the plan.

    The scheduler finishes a request itself when it reaches max_tokens (no EOS ids are set here).
    """
    output = scheduler.schedule()
    plan = list(output.num_scheduled_tokens.items())
    runner_output = ModelRunnerOutput(list(output.sampling_request_ids),
                                      [[FAKE_TOKEN] for _ in output.sampling_request_ids])
    scheduler.update_from_output(output, runner_output)
    return plan, output


def test_long_prompt_is_chunked_and_short_prompts_are_fused():
    scheduler = make_scheduler(budget=8)
    add(scheduler, "long", 20)
    add(scheduler, "short", 3)
    assert fake_step(scheduler)[0] == [("long", 8)]
    assert fake_step(scheduler)[0] == [("long", 8)]
    # The last chunk of "long" (4 tokens) samples; "short" fills the rest of the budget.
    assert fake_step(scheduler)[0] == [("long", 4), ("short", 3)]
    # Both now decode: 1 token each.
    assert fake_step(scheduler)[0] == [("long", 1), ("short", 1)]


def test_budget_is_never_exceeded_and_running_go_first():
    scheduler = make_scheduler(budget=10, max_num_seqs=8)
    for i in range(6):
        add(scheduler, f"r{i}", 7 + i, max_tokens=5)
    seen_running_first = False
    while scheduler.has_unfinished_requests():
        running_before = [r.request_id for r in scheduler.running]
        plan, output = fake_step(scheduler)
        assert output.total_num_scheduled_tokens <= 10
        ids = [request_id for request_id, _ in plan]
        # Requests already running come first, in admission order.
        assert ids[:len(running_before)] == [r for r in running_before if r in ids][:len(running_before)]
        seen_running_first |= bool(running_before) and len(ids) > len(running_before)
    assert seen_running_first
    assert scheduler.kv_cache.num_free_blocks == 64


def test_only_the_last_chunk_samples():
    scheduler = make_scheduler(budget=5)
    request = add(scheduler, "a", 12, max_tokens=2)
    fake_step(scheduler)
    fake_step(scheduler)
    assert request.output_token_ids == []
    fake_step(scheduler)  # tokens 10..11: prompt complete
    assert request.output_token_ids == [FAKE_TOKEN]
    assert request.num_computed_tokens == 12


def test_max_num_seqs_limits_running_requests():
    scheduler = make_scheduler(budget=100, max_num_seqs=2)
    for i in range(3):
        add(scheduler, f"r{i}", 4, max_tokens=2)
    plan, _ = fake_step(scheduler)
    assert plan == [("r0", 4), ("r1", 4)]
    plan, _ = fake_step(scheduler)
    assert plan == [("r0", 1), ("r1", 1)]  # both finish now
    plan, _ = fake_step(scheduler)
    assert plan == [("r2", 4)]


def test_preemption_takes_the_newest_and_it_resumes_first_with_its_tokens():
    # 6 blocks of 4 tokens. Three 8-token prompts take 6 blocks; the first decode needs a 7th.
    scheduler = make_scheduler(budget=64, max_num_seqs=8, num_blocks=6, block_size=4)
    a, b, c = (add(scheduler, name, 8, max_tokens=3, first_token=100 * (i + 1)) for i, name in enumerate("abc"))
    plan, output = fake_step(scheduler)
    assert plan == [("a", 8), ("b", 8), ("c", 8)]
    assert scheduler.kv_cache.num_free_blocks == 0
    plan, output = fake_step(scheduler)
    # a's first decode needs a 3rd block: c (newest) is preempted, freeing 2; b's then fits.
    assert output.preempted_request_ids == ["c"]
    assert plan == [("a", 1), ("b", 1)]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert c.output_token_ids == [FAKE_TOKEN]  # generated tokens are kept
    assert scheduler.waiting == [c]
    # c resumes (recompute of prompt + its token) as soon as room appears, ahead of later arrivals.
    d = add(scheduler, "d", 4, max_tokens=1, order=10)
    while c.num_output_tokens < 3:
        fake_step(scheduler)
    assert scheduler.waiting == [] or scheduler.waiting[0] is d
    while scheduler.has_unfinished_requests():
        fake_step(scheduler)
    assert [len(r.output_token_ids) for r in (a, b, c, d)] == [3, 3, 3, 1]
    assert scheduler.kv_cache.num_free_blocks == 6
    assert scheduler.num_preemptions >= 1


def test_preemption_picks_lowest_priority_first():
    scheduler = make_scheduler(budget=64, max_num_seqs=8, num_blocks=6, block_size=4)
    add(scheduler, "urgent-new", 8, max_tokens=3, order=2, priority=0, first_token=300)
    add(scheduler, "lazy-old", 8, max_tokens=3, order=0, priority=5, first_token=100)
    add(scheduler, "normal", 8, max_tokens=3, order=1, priority=1, first_token=200)
    plan, _ = fake_step(scheduler)
    assert plan == [("urgent-new", 8), ("normal", 8), ("lazy-old", 8)]  # waiting order: priority first
    _, output = fake_step(scheduler)
    assert output.preempted_request_ids == ["lazy-old"]


def test_waiting_request_that_does_not_fit_blocks_later_ones():
    scheduler = make_scheduler(budget=64, max_num_seqs=8, num_blocks=4, block_size=4)
    add(scheduler, "big", 12, max_tokens=8)
    add(scheduler, "bigger", 12, max_tokens=1)
    add(scheduler, "tiny", 2, max_tokens=1)
    plan, _ = fake_step(scheduler)
    assert plan == [("big", 12)]  # "bigger" needs 3 blocks, 1 is free; "tiny" must not overtake it


def test_prefix_cache_hit_skips_computed_tokens():
    scheduler = make_scheduler(budget=64)
    add(scheduler, "first", 10, max_tokens=1)
    fake_step(scheduler)
    second = add(scheduler, "second", 10, max_tokens=1)
    plan, _ = fake_step(scheduler)
    assert plan == [("second", 2)]       # blocks [0..3], [4..7] hit; tokens 8, 9 computed
    assert second.num_cached_tokens == 8


def test_sibling_waits_for_its_leader_prompt():
    scheduler = make_scheduler(budget=6)
    leader = add(scheduler, "p#0", 10, max_tokens=2)
    sibling = Request("p#1", list(leader.prompt_token_ids), SamplingParams(), arrival_time=0.0, max_tokens=2,
                      arrival_order=0, prefill_leader_id=leader.request_id)
    scheduler.add_request(sibling)
    other = add(scheduler, "other", 3, max_tokens=1, order=5)
    assert fake_step(scheduler)[0] == [("p#0", 6)]
    # The sibling is skipped while the leader's prompt is incomplete; later arrivals may go ahead.
    assert fake_step(scheduler)[0] == [("p#0", 4), ("other", 2)]
    plan, _ = fake_step(scheduler)
    # Running first; then the sibling, whose first 8 prompt tokens are the leader's cached blocks.
    assert plan == [("p#0", 1), ("other", 1), ("p#1", 2)]
    assert sibling.num_cached_tokens == 8 and other.num_output_tokens == 1


@pytest.mark.parametrize("budget", [1, 3, 16])
def test_every_request_finishes_and_all_blocks_return(budget):
    scheduler = make_scheduler(budget=budget, max_num_seqs=3, num_blocks=10, block_size=4)
    requests = [add(scheduler, f"r{i}", 3 + 5 * i, max_tokens=4, first_token=10 * i) for i in range(5)]
    steps = 0
    while scheduler.has_unfinished_requests():
        _, output = fake_step(scheduler)
        assert output.total_num_scheduled_tokens <= budget
        steps += 1
        assert steps < 500
    assert all(r.num_output_tokens == 4 for r in requests)
    assert scheduler.kv_cache.num_free_blocks == 10


def test_prefix_cache_stats_count_each_admission_once():
    scheduler = make_scheduler(budget=64, max_num_seqs=8, num_blocks=4, block_size=4)
    add(scheduler, "first", 10, max_tokens=1)
    fake_step(scheduler)                       # admitted: 10 tokens looked up, no hits
    add(scheduler, "hog", 13, max_tokens=3, first_token=500)
    fake_step(scheduler)                       # takes all 4 blocks
    add(scheduler, "second", 10, max_tokens=1)
    fake_step(scheduler)                       # "second" waits: no room, not counted
    fake_step(scheduler)
    assert (scheduler.kv_cache.prefix_cache_queries, scheduler.kv_cache.prefix_cache_hits) == (23, 0)
