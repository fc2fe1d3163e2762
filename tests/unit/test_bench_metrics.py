"""Benchmark metrics on hand-made timestamps with known answers (TTFT, TBT, TPOT, effective throughput, fluidity, goodput)."""

import math

import pytest

from splitfuse.bench.metrics import (
    Slo,
    effective_throughput,
    ema,
    fluidity_deadlines,
    fluidity_index,
    latency_stats,
    meets_slo,
    passes_fastgen_sla,
    run_duration_s,
    slo_attainment,
    summarize,
)
from splitfuse.bench.records import RequestRecord
from splitfuse.bench.sweep import search_goodput


def record(send, tokens, output_tokens=None, prompt_tokens=512, error=None, request_id=0):
    return RequestRecord(
        request_id=request_id, prompt_tokens=prompt_tokens,
        requested_output_tokens=output_tokens or len(tokens), send_time_s=send,
        token_times_s=list(tokens), end_time_s=tokens[-1] if tokens else send,
        output_tokens=len(tokens) if output_tokens is None else output_tokens, error=error,
    )


def from_gaps(send, ttft, gaps, **kwargs):
    times = [send + ttft]
    for gap in gaps:
        times.append(times[-1] + gap)
    return record(send, times, **kwargs)


# ---------------------------------------------------------------- per-request latencies


def test_ttft_tbt_tpot_e2e_of_one_request():
    r = record(send=10.0, tokens=[10.5, 10.6, 10.8, 11.1])
    assert r.ttft_s == pytest.approx(0.5)
    assert r.tbt_gaps_s == pytest.approx([0.1, 0.2, 0.3])
    assert r.tpot_s == pytest.approx(0.6 / 3)
    assert r.e2e_s == pytest.approx(1.1)


def test_tpot_counts_tokens_from_usage_when_chunks_carry_several():
    # 2 chunks carried 5 tokens: TPOT = (2.0 - 1.0) / (5 - 1)
    r = record(send=0.0, tokens=[1.0, 2.0], output_tokens=5)
    assert r.tpot_s == pytest.approx(0.25)
    assert record(send=0.0, tokens=[1.0]).tpot_s is None


def test_latency_stats_mean_and_percentiles():
    stats = latency_stats(float(v) for v in range(101))  # 0, 1, ..., 100
    assert stats == {"mean": 50.0, "p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert latency_stats([]) is None


def test_summary_pools_tbt_gaps_and_counts_errors_without_dropping_them():
    a = from_gaps(0.0, 0.5, [0.1, 0.2, 0.3, 0.4], prompt_tokens=10, request_id=0)
    b = from_gaps(1.0, 0.2, [0.5], prompt_tokens=20, request_id=1)
    failed = RequestRecord(2, 30, 8, send_time_s=1.5, end_time_s=4.0, error="HTTP 500: boom")
    summary = summarize([a, b, failed], effective_rates=())
    assert summary["num_requests"] == 3
    assert summary["num_succeeded"] == 2
    assert summary["num_errors"] == 1
    assert summary["error_counts"] == {"HTTP 500": 1}
    assert summary["duration_s"] == pytest.approx(4.0)  # first send 0.0 to the failure at 4.0
    # pooled gaps [0.1, 0.2, 0.3, 0.4, 0.5]
    assert summary["tbt_s"]["p50"] == pytest.approx(0.3)
    assert summary["tbt_s"]["p90"] == pytest.approx(0.46)
    assert summary["tbt_s"]["p99"] == pytest.approx(0.496)
    assert summary["tbt_s"]["max"] == pytest.approx(0.5)
    assert summary["ttft_s"]["mean"] == pytest.approx(0.35)
    # TPOT: a = 1.0 / 4, b = 0.5 / 1
    assert summary["tpot_s"]["mean"] == pytest.approx((0.25 + 0.5) / 2)
    assert summary["e2e_s"]["max"] == pytest.approx(1.5)
    assert summary["total_output_tokens"] == 7
    assert summary["output_tokens_per_s"] == pytest.approx(7 / 4.0)
    assert summary["total_tokens_per_s"] == pytest.approx((7 + 30) / 4.0)
    assert summary["requests_per_s"] == pytest.approx(2 / 4.0)


def test_run_duration_is_first_send_to_last_end():
    assert run_duration_s([record(1.0, [2.0, 3.0]), record(2.0, [5.0])]) == pytest.approx(4.0)
    assert run_duration_s([]) == 0.0


# ---------------------------------------------------------------- effective throughput (FastGen)


def test_ema_is_bias_corrected_with_span_16():
    decay = 1 - 2 / 17
    values = [0.2, 0.2, 0.2, 0.5]
    expected_last = (0.5 + decay * 0.2 + decay**2 * 0.2 + decay**3 * 0.2) / (1 + decay + decay**2 + decay**3)
    averages = ema(values)
    assert averages[0] == pytest.approx(0.2)
    assert averages[-1] == pytest.approx(expected_last)
    assert ema([0.25] * 40) == pytest.approx([0.25] * 40)


def test_fastgen_prefill_sla_boundary():
    # 512 prompt tokens may take 1.0 s to the first token
    assert passes_fastgen_sla(from_gaps(0.0, 1.0, [0.1] * 5, prompt_tokens=512), 4)
    assert not passes_fastgen_sla(from_gaps(0.0, 1.0 + 1e-6, [0.1] * 5, prompt_tokens=512), 4)
    assert passes_fastgen_sla(from_gaps(0.0, 0.5, [0.1] * 5, prompt_tokens=256), 4)
    assert not passes_fastgen_sla(from_gaps(0.0, 0.51, [0.1] * 5, prompt_tokens=256), 4)


def test_fastgen_decode_sla_boundary():
    steady = from_gaps(0.0, 0.1, [0.25] * 30)
    assert passes_fastgen_sla(steady, 4)  # EMA exactly 1/4 s: passes
    assert not passes_fastgen_sla(from_gaps(0.0, 0.1, [0.25 + 1e-6] * 30), 4)
    assert not passes_fastgen_sla(steady, 4.001)


def test_fastgen_sla_tolerates_a_spike_the_ema_smooths():
    # one 0.5 s gap after 15 steady 0.2 s gaps: the EMA peaks at the spike, ≈ 0.241 s
    gaps = [0.2] * 15 + [0.5]
    spiky = from_gaps(0.0, 0.1, gaps)
    peak = ema(gaps)[-1]
    assert peak == pytest.approx(0.2408, abs=1e-4)
    assert passes_fastgen_sla(spiky, 1.0 / peak)
    assert not passes_fastgen_sla(spiky, 1.0 / peak * 1.001)
    assert passes_fastgen_sla(spiky, 4)  # 0.241 <= 0.25 although one gap is 0.5
    assert not passes_fastgen_sla(spiky, 6)


def test_effective_throughput_is_requests_per_s_times_fraction_passed():
    good = [from_gaps(float(i), 0.1, [0.1] * 4, request_id=i) for i in range(3)]
    slow = from_gaps(3.0, 0.1, [0.4] * 4, request_id=3)
    failed = RequestRecord(4, 512, 5, send_time_s=3.0, error="HTTP 500")
    result = effective_throughput(good + [slow, failed], duration_s=2.0, target_tokens_per_s=4)
    assert result["pass_fraction"] == pytest.approx(3 / 5)
    assert result["requests_per_s"] == pytest.approx(5 / 2.0 * 3 / 5)
    summary = summarize(good + [slow, failed], duration_s=2.0, effective_rates=(2, 4, 6))
    assert summary["effective_throughput"]["2"]["pass_fraction"] == pytest.approx(4 / 5)
    assert summary["effective_throughput"]["4"]["pass_fraction"] == pytest.approx(3 / 5)


# ---------------------------------------------------------------- fluidity-index (Etalon)


def test_fluidity_stall_counts_every_missed_period_and_resets_the_schedule():
    # D_p = 1, D_d = 0.5: due 1.0 (met), 1.5 (met), 2.0 (2.6 is 0.6 late: 2 misses), then 3.1 (met)
    assert fluidity_deadlines(0.0, [0.5, 1.0, 2.6, 3.0], 1.0, 0.5) == (3, 5)
    assert fluidity_deadlines(0.0, [0.5, 1.0, 2.6, 3.0], 1.0, 0.5, count_missed_periods=False) == (3, 4)


def test_fluidity_carries_slack_forward():
    # early tokens bank slack: the third token comes 1.6 s after the second yet meets its 2.0 s deadline
    assert fluidity_deadlines(0.0, [0.2, 0.3, 1.9], 1.0, 0.5) == (3, 3)
    # no slack: the same 1.6 s gap misses
    assert fluidity_deadlines(0.0, [1.0, 1.5, 3.1], 1.0, 0.5) == (2, 5)


def test_fluidity_after_a_miss_deadlines_restart_from_the_late_token():
    # due 1.0 (met), 1.5: 2.0 is late by 0.5 -> 2 misses; next due 2.5 (2.4 met), then 3.0 (3.0 met)
    assert fluidity_deadlines(5.0, [5.5, 7.0, 7.4, 8.0], 1.0, 0.5) == (3, 5)
    # a late first token: due 1.0, arrives 1.2 -> 1 miss; next due 1.7 (met), then 2.2 (met)
    assert fluidity_deadlines(0.0, [1.2, 1.7, 2.2], 1.0, 0.5) == (2, 3)


def test_fluidity_index_pools_deadlines_over_successful_requests():
    a = record(0.0, [0.5, 1.0, 2.6, 3.0])  # (3, 5)
    b = record(0.0, [0.2, 0.3, 1.9])  # (3, 3)
    failed = RequestRecord(9, 10, 5, send_time_s=0.0, token_times_s=[9.0], error="timeout")
    result = fluidity_index([a, b, failed], 1.0, 0.5)
    assert result["index"] == pytest.approx(6 / 8)
    assert result["mean_request_index"] == pytest.approx((3 / 5 + 1.0) / 2)


# ---------------------------------------------------------------- SLO attainment and goodput (DistServe)


def test_meets_slo_at_the_boundary_and_failures_are_misses():
    slo = Slo(ttft_s=1.0, tpot_s=0.1)
    assert meets_slo(from_gaps(0.0, 1.0, [0.1] * 4), slo)
    assert not meets_slo(from_gaps(0.0, 1.01, [0.1] * 4), slo)
    assert not meets_slo(from_gaps(0.0, 0.5, [0.11] * 4), slo)
    assert meets_slo(record(0.0, [0.5]), slo)  # one token: TPOT is undefined, waived
    failed = RequestRecord(3, 10, 5, send_time_s=0.0, error="HTTP 500")
    assert slo_attainment([from_gaps(0.0, 0.5, [0.1]), failed], slo) == 0.5


def fake_server_at_rate(rate):
    """Ten requests whose latencies grow with the rate; request i is (1 + i/10) times slower than i=0.

    TTFT_i = 0.05 s × rate × (1 + i/10): with a 1 s TTFT SLO, 9 of 10 requests meet it
    while 0.05 × rate × 1.8 <= 1, i.e. up to rate 11.11. TPOT stays well inside its SLO.
    """
    records = []
    for i in range(10):
        ttft = 0.05 * rate * (1 + i / 10)
        records.append(from_gaps(0.0, ttft, [0.001] * 3, request_id=i))
    return records


def test_goodput_search_finds_the_highest_rate_with_90_percent_attainment():
    result = search_goodput(fake_server_at_rate, Slo(ttft_s=1.0, tpot_s=0.05), start_rate=1.0,
                            rel_tolerance=0.01, max_probes=30)
    boundary = 1.0 / (0.05 * 1.8)
    assert boundary * 0.99 <= result.rate <= boundary
    rates = [rate for rate, _ in result.probes]
    assert rates[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]  # exponential phase, then bisection in [8, 16]
    assert all(8.0 <= rate <= 16.0 for rate in rates[5:])
    assert len(result.probes) <= 30


def test_goodput_search_halves_when_the_start_rate_fails():
    result = search_goodput(fake_server_at_rate, Slo(ttft_s=1.0, tpot_s=0.05), start_rate=100.0,
                            rel_tolerance=0.01, max_probes=30)
    # attainment at 12.5/s is 7/10 (< 90 %), at 6.25/s 10/10: the bracket is [6.25, 12.5]
    assert result.probes[:5] == [(100.0, 0.0), (50.0, 0.0), (25.0, 0.0), (12.5, 0.7), (6.25, 1.0)]
    assert 1.0 / (0.05 * 1.8) * 0.99 <= result.rate <= 1.0 / (0.05 * 1.8)


def test_goodput_is_zero_when_no_rate_meets_the_slo():
    result = search_goodput(fake_server_at_rate, Slo(ttft_s=1e-6, tpot_s=1e-6), max_probes=5)
    assert result.rate == 0.0
    assert len(result.probes) == 5
    assert math.isclose(result.probes[-1][0], 1.0 / 16)
