"""Sampler specification: greedy, top-k/top-p/min-p sets, seeds, bias, min_tokens, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from splitfuse.sample import Sampler, SamplingRow
from splitfuse.sample.sampler import apply_penalties
from splitfuse.sampling_params import SamplingParams

EOS = 0


def make_row(prompt: list[int] | None = None, output: list[int] | None = None, **params) -> SamplingRow:
    sampling_params = SamplingParams(**params)
    generator = None
    if sampling_params.seed is not None:
        generator = torch.Generator().manual_seed(sampling_params.seed)
    return SamplingRow(sampling_params, list(prompt or [1]), list(output or []), generator)


def log_probs(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


def draw_many(logits_row: list[float], num_draws: int = 2000, **params) -> set[int]:
    """Tokens emitted by num_draws independent rows sharing one set of logits (one call)."""
    sampler = Sampler(vocab_size=len(logits_row), eos_token_ids=[EOS])
    logits = torch.tensor([logits_row] * num_draws)
    return set(sampler(logits, [make_row(**params) for _ in range(num_draws)]).token_ids)


def test_greedy_is_argmax_in_fp32_and_bf16():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(vocab_size=40, eos_token_ids=[EOS])
    rows = [make_row(temperature=0.0) for _ in range(5)]
    assert sampler(logits, rows).token_ids == logits.argmax(-1).tolist()
    bf16 = logits.to(torch.bfloat16)
    assert sampler(bf16, rows).token_ids == bf16.float().argmax(-1).tolist()


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    rows = [make_row(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    token_ids = Sampler(40, [EOS])(logits, rows).token_ids
    assert token_ids[0::2] == logits.argmax(-1).tolist()[0::2]


def test_top_k_1_is_greedy():
    logits = torch.randn(200, 30, generator=torch.Generator().manual_seed(2))
    rows = [make_row(temperature=1.5, top_k=1) for _ in range(200)]
    assert Sampler(30, [EOS])(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_padded_logit_columns_are_never_sampled():
    logits = torch.zeros(100, 12)
    logits[:, 10:] = 50.0  # columns past vocab_size=10 are padding
    assert max(Sampler(10, [EOS])(logits, [make_row() for _ in range(100)]).token_ids) < 10
    assert Sampler(10, [EOS])(logits[:1], [make_row(temperature=0.0)]).token_ids == [0]


def test_top_k_emits_exactly_the_k_best():
    logits = [0.0, 3.0, 1.0, 2.5, -1.0, 2.0, 0.5]
    assert draw_many(logits, top_k=3) == {1, 3, 5}


def test_top_k_keeps_ties_at_the_boundary():
    logits = [1.0, 2.0, 2.0, 2.0, 0.0, 3.0]
    assert draw_many(logits, top_k=2) == {1, 2, 3, 5}


def test_top_p_keeps_the_smallest_set_reaching_top_p():
    logits = log_probs(0.4, 0.3, 0.2, 0.1)
    assert draw_many(logits, top_p=0.01) == {0}
    assert draw_many(logits, top_p=0.65) == {0, 1}
    assert draw_many(logits, top_p=0.75) == {0, 1, 2}
    assert draw_many(logits, top_p=1.0) == {0, 1, 2, 3}


def test_top_p_applies_after_temperature():
    # temperature 0.5 squares probabilities: [0.4, 0.3, 0.2, 0.1] -> [.53, .30, .13, .03]
    assert draw_many(log_probs(0.4, 0.3, 0.2, 0.1), temperature=0.5, top_p=0.8) == {0, 1}


def test_min_p_cuts_below_a_fraction_of_the_best():
    logits = log_probs(0.5, 0.3, 0.15, 0.05)
    assert draw_many(logits, min_p=0.5) == {0, 1}  # threshold 0.25
    assert draw_many(logits, min_p=0.2) == {0, 1, 2}  # threshold 0.1


def test_top_k_top_p_min_p_combine_per_row():
    logits_row = log_probs(0.3, 0.25, 0.2, 0.15, 0.1)
    row_params = [dict(top_k=2), dict(top_p=0.5), dict(min_p=0.6), dict(top_k=4, top_p=0.9), {}]
    rows = [make_row(**row_params[i % 5]) for i in range(5 * 800)]
    token_ids = Sampler(5, [EOS])(torch.tensor([logits_row] * len(rows)), rows).token_ids
    emitted = [set(token_ids[i::5]) for i in range(5)]
    # top_p 0.9 over the top 4 renormalised [.33, .28, .22, .17]: mass before the 4th is .83
    assert emitted == [{0, 1}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2, 3, 4}]


def sample_sequence(row_position: int, seed: int, num_steps: int = 8, vocab: int = 500) -> list[int]:
    """Tokens of one seeded row over several steps, surrounded by other random rows."""
    sampler = Sampler(vocab, [EOS], seed=row_position)
    noise = torch.Generator().manual_seed(100 + row_position)
    target = make_row(seed=seed, top_p=0.95)
    others = [make_row(seed=7 + i) if i % 2 else make_row(top_k=50) for i in range(5)]
    tokens = []
    for step in range(num_steps):
        target_logits = torch.randn(vocab, generator=torch.Generator().manual_seed(step))
        rows = others[:row_position] + [target] + others[row_position:]
        logits = torch.randn(len(rows), vocab, generator=noise)
        logits[row_position] = target_logits
        token = sampler(logits, rows).token_ids[row_position]
        target.output_token_ids.append(token)
        tokens.append(token)
    return tokens


def test_same_seed_same_tokens_at_any_batch_position():
    assert sample_sequence(row_position=0, seed=1234) == sample_sequence(row_position=3, seed=1234)


def test_different_seeds_differ():
    assert sample_sequence(row_position=0, seed=1) != sample_sequence(row_position=0, seed=2)


def test_logit_bias_bans_and_forces():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    assert Sampler(4, [EOS])(logits, [make_row(temperature=0.0, logit_bias={1: -100})]).token_ids == [3]
    assert draw_many([0.0] * 6, logit_bias={4: 100}) == {4}
    assert draw_many([0.0] * 6, logit_bias={4: -100}) == {0, 1, 2, 3, 5}


def test_min_tokens_suppresses_eos_and_stop_tokens_then_releases():
    sampler = Sampler(6, eos_token_ids=[EOS, 5])
    logits = torch.tensor([[9.0, 1.0, 2.0, 8.0, 0.0, 9.5]])  # eos ids 0 and 5, stop token 3
    params = dict(temperature=0.0, min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    assert sampler(logits, [make_row(output=[], **params)]).token_ids == [2]
    assert sampler(logits, [make_row(output=[4], **params)]).token_ids == [2]
    assert sampler(logits, [make_row(output=[4, 4], **params)]).token_ids == [5]


def test_min_tokens_in_bf16_leaves_the_logits_alone_and_other_rows_greedy():
    sampler = Sampler(6, eos_token_ids=[EOS, 5])
    logits = torch.tensor([[9.0, 1.0, 2.0, 8.0, 0.0, 9.5]] * 3, dtype=torch.bfloat16)
    before = logits.clone()
    rows = [make_row(output=[], temperature=0.0, min_tokens=2, stop_token_ids=[3]),
            make_row(output=[], temperature=0.0),
            make_row(output=[4, 4], temperature=0.0, min_tokens=2)]
    assert sampler(logits, rows).token_ids == [2, 5, 5]
    assert torch.equal(logits, before)
    # eos ties with a later token: the raw argmax (first index) is banned, the tie partner wins.
    tied = torch.tensor([[9.0, 1.0, 9.0, 8.0, 0.0, 2.0]], dtype=torch.bfloat16)
    assert sampler(tied, [make_row(output=[], temperature=0.0, min_tokens=1)]).token_ids == [2]


def test_repetition_presence_frequency_penalties_by_hand():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0]] * 4)
    rows = [
        make_row(prompt=[0], output=[1, 2, 2], repetition_penalty=2.0),
        make_row(prompt=[0], output=[1, 2, 2], frequency_penalty=0.5, presence_penalty=0.25),
        make_row(prompt=[0], output=[1, 2, 2], repetition_penalty=2.0, frequency_penalty=0.5,
                 presence_penalty=0.25),
        make_row(prompt=[0], output=[1, 2, 2]),
    ]
    apply_penalties(logits, rows)
    expected = torch.tensor([
        [1.0, -4.0, 0.5, 0.5, -1.0],  # seen in prompt or output: x>0 -> x/2, x<0 -> x*2
        [2.0, -2.75, -0.25, 0.5, -1.0],  # output only: -(0.5*count + 0.25)
        [1.0, -4.75, -0.75, 0.5, -1.0],  # repetition first, then frequency/presence
        [2.0, -2.0, 1.0, 0.5, -1.0],  # no penalties: untouched
    ])
    assert logits.tolist() == expected.tolist()  # every value is exact in binary


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0]])
    row = make_row(prompt=[3], output=[1], temperature=0.0, presence_penalty=1.0)
    assert Sampler(4, [EOS])(logits, [row]).token_ids == [2]


def test_logprobs_are_log_softmax_of_raw_logits_with_ranks():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 30, generator=generator)
    rows = [
        make_row(temperature=0.0, logprobs=3),
        make_row(temperature=0.7, top_k=5, repetition_penalty=1.5, logprobs=5),
        make_row(temperature=1.0),
        make_row(temperature=0.0, logprobs=0, presence_penalty=2.0, output=[int(logits[3].argmax())]),
    ]
    out = Sampler(30, [EOS])(logits.clone(), rows)
    expected = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        chosen_logprob, rank, top_ids, top_logprobs = out.logprobs[i]
        token_id = out.token_ids[i]
        assert abs(chosen_logprob - expected[i, token_id].item()) < 1e-5
        assert rank == int((expected[i] > expected[i, token_id]).sum()) + 1
        k = rows[i].params.logprobs
        assert top_ids == expected[i].topk(k).indices.tolist() if k else top_ids == []
        assert top_logprobs == pytest.approx(expected[i].topk(k).values.tolist(), abs=1e-5)
    assert out.logprobs[0][1] == 1


def test_logprobs_rank_when_chosen_token_is_outside_top_k():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    row = make_row(temperature=0.0, logit_bias={3: 100}, logprobs=2)
    out = Sampler(5, [EOS])(logits, [row])
    expected = torch.log_softmax(logits[0], dim=-1)
    assert out.token_ids == [3]
    chosen_logprob, rank, top_ids, top_logprobs = out.logprobs[0]
    assert rank == 4 and top_ids == [0, 1]
    assert chosen_logprob == pytest.approx(expected[3].item(), abs=1e-5)
    assert top_logprobs == pytest.approx(expected[:2].tolist(), abs=1e-5)


def test_caller_logits_are_not_modified():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(4))
    before = logits.clone()
    rows = [make_row(top_k=3, logit_bias={1: 5.0}, repetition_penalty=1.3, output=[2], temperature=0.5)
            for _ in range(3)]
    Sampler(20, [EOS])(logits, rows)
    assert torch.equal(logits, before)
