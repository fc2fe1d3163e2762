"""Arrival processes (Poisson, gamma, trace) and workloads (exact prompt lengths, shared prefixes, multi-turn) of the benchmark."""

import json

import numpy as np
import pytest

from splitfuse.bench.arrivals import (
    ArrivalConfig,
    gamma_intervals,
    load_trace,
    poisson_intervals,
    send_offsets,
)
from splitfuse.bench.sweep import sweep_arrivals
from splitfuse.bench.workloads import (
    LengthDist,
    WorkloadConfig,
    build_sessions,
    flatten,
    text_of_length,
)

SAMPLES = 100_000


def mean_and_cv(values):
    return values.mean(), values.std() / values.mean()


# ---------------------------------------------------------------- inter-arrival times


@pytest.mark.parametrize("seed", [0, 1])
def test_poisson_intervals_have_mean_one_over_rate_and_cv_one(seed):
    mean, cv = mean_and_cv(poisson_intervals(4.0, SAMPLES, np.random.default_rng(seed)))
    assert mean == pytest.approx(0.25, rel=0.02)
    assert cv == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("cv_target", [0.5, 2.0, 3.0])
def test_gamma_intervals_have_the_chosen_mean_and_cv(cv_target):
    mean, cv = mean_and_cv(gamma_intervals(2.0, cv_target, SAMPLES, np.random.default_rng(7)))
    assert mean == pytest.approx(0.5, rel=0.02)
    assert cv == pytest.approx(cv_target, rel=0.05)


def test_open_loop_offsets_start_at_zero_and_follow_the_rate():
    config = ArrivalConfig(kind="gamma", rate=10.0, cv=2.0)
    offsets = send_offsets(config, 20_001, np.random.default_rng(3))
    assert offsets[0] == 0.0
    assert np.all(np.diff(offsets) >= 0)
    assert offsets[-1] / 20_000 == pytest.approx(0.1, rel=0.05)


def test_same_seed_same_schedule():
    config = ArrivalConfig(kind="poisson", rate=3.0)
    first = send_offsets(config, 50, np.random.default_rng(11))
    again = send_offsets(config, 50, np.random.default_rng(11))
    assert np.array_equal(first, again)


def test_arrival_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rate"):
        ArrivalConfig(kind="poisson", rate=0.0)
    with pytest.raises(ValueError, match="concurrency"):
        ArrivalConfig(kind="closed", concurrency=0)
    with pytest.raises(ValueError, match="trace_path"):
        ArrivalConfig(kind="trace")


def test_sweep_replaces_concurrency_or_rate():
    closed = sweep_arrivals(ArrivalConfig(kind="closed"), [1, 2, 8])
    assert [a.concurrency for a in closed] == [1, 2, 8]
    gamma = sweep_arrivals(ArrivalConfig(kind="gamma", cv=3.0), [0.5, 4])
    assert [(a.rate, a.cv) for a in gamma] == [(0.5, 3.0), (4.0, 3.0)]
    with pytest.raises(ValueError):
        sweep_arrivals(ArrivalConfig(kind="closed"), [1.5])


# ---------------------------------------------------------------- traces


def test_burstgpt_csv_trace_is_sorted_and_skips_failed_rows(tmp_path):
    path = tmp_path / "burst.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "10.0,ChatGPT,472,18,490,Conversation log\n"
        "5.0,ChatGPT,1087,0,1087,Conversation log\n"  # failed: no response
        "7.5,GPT-4,200,31,231,API log\n"
    )
    entries = load_trace(path)
    assert [(e.timestamp_s, e.prompt_tokens, e.output_tokens) for e in entries] == [
        (7.5, 200, 31), (10.0, 472, 18)]
    config = ArrivalConfig(kind="trace", trace_path=str(path), trace_time_scale=0.5)
    assert list(send_offsets(config, 2, np.random.default_rng(0), entries)) == [0.0, 1.25]


def test_jsonl_trace_with_aliases_sets_request_lengths(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 1.0, "prompt_tokens": 12, "output_tokens": 3},
            {"timestamp": 1.5, "input_tokens": 7, "output_length": 4}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    entries = load_trace(path)
    specs = flatten(build_sessions(WorkloadConfig(num_requests=5), entries))
    assert [(s.num_prompt_tokens, s.max_tokens) for s in specs] == [(12, 3), (7, 4)]


# ---------------------------------------------------------------- workloads


def test_length_spec_parsing():
    assert LengthDist.parse("512") == LengthDist("fixed", 512)
    assert LengthDist.parse("uniform:10:20") == LengthDist("uniform", 15, low=10, high=20)
    assert LengthDist.parse("normal:100").describe() == "normal:100"
    assert LengthDist.parse("normal:100:5").std == 5.0
    with pytest.raises(ValueError, match="bad length spec"):
        LengthDist.parse("gauss:3")


def test_normal_lengths_use_std_of_0_3_times_mean():
    lengths = LengthDist.parse("normal:1000").sample(SAMPLES, np.random.default_rng(0))
    assert lengths.mean() == pytest.approx(1000, rel=0.01)
    assert lengths.std() == pytest.approx(300, rel=0.02)
    assert lengths.min() >= 1


def test_synthetic_prompts_have_exact_lengths_and_safe_ids():
    config = WorkloadConfig(num_requests=50, prompt_len=LengthDist.parse("uniform:5:9"),
                            output_len=LengthDist("fixed", 7), vocab_low=100, vocab_high=1000)
    specs = flatten(build_sessions(config))
    assert len(specs) == 50
    assert [s.request_id for s in specs] == list(range(50))
    assert {s.num_prompt_tokens for s in specs} <= set(range(5, 10))
    assert all(s.max_tokens == 7 for s in specs)
    assert all(100 <= i < 1000 for s in specs for i in s.prompt_token_ids)
    assert flatten(build_sessions(config)) == specs  # seeded


def test_shared_prefix_requests_start_with_one_of_k_prefixes():
    config = WorkloadConfig(kind="shared-prefix", num_requests=40, num_prefixes=3, prefix_len=32,
                            prompt_len=LengthDist("fixed", 8))
    specs = flatten(build_sessions(config))
    prefixes = {s.prompt_token_ids[:32] for s in specs}
    assert len(prefixes) == 3
    assert all(s.num_prompt_tokens == 40 for s in specs)
    assert len({s.prompt_token_ids for s in specs}) == 40  # the questions differ


def test_multi_turn_prompts_extend_the_previous_turn():
    config = WorkloadConfig(kind="multi-turn", num_requests=7, num_turns=3,
                            prompt_len=LengthDist("fixed", 10), output_len=LengthDist("fixed", 4))
    sessions = build_sessions(config)
    assert [len(session) for session in sessions] == [3, 3, 1]
    first = sessions[0]
    assert [s.num_prompt_tokens for s in first] == [10, 24, 38]  # + 4 answer + 10 new each turn
    assert first[1].prompt_token_ids[:10] == first[0].prompt_token_ids
    assert first[2].prompt_token_ids[:24] == first[1].prompt_token_ids
    assert [s.turn for s in first] == [0, 1, 2]
    assert [s.request_id for s in flatten(sessions)] == list(range(7))


class MergingTokenizer:
    """Ids 0/1 are letters 'a'/'b'; id 2 is 'ab', which encoding always merges into."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join({0: "a", 1: "b", 2: "ab"}[i] for i in ids)

    def encode(self, text, add_special_tokens=False):
        ids, position = [], 0
        while position < len(text):
            if text.startswith("ab", position):
                ids.append(2)
                position += 2
            else:
                ids.append(0 if text[position] == "a" else 1)
                position += 1
        return ids


def test_text_prompts_are_trimmed_or_padded_to_the_exact_token_count():
    text, ids = text_of_length(MergingTokenizer(), [0, 1, 0, 1])  # "abab" encodes to 2 tokens
    assert len(ids) == 4
    assert MergingTokenizer().encode(text) == list(ids)
