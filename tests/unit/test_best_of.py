"""best_of in the frontend: the fan-out into best_of sequences that carry their logprobs, and the pick of the n
sequences of the highest cumulative logprob, fed exact core outputs (token ids and chosen-token logprobs).

Tiny tokenizer ids: 280 " c", 370 "at", 296 " s", 277 " t", 286 "he"; EOS is 2.
"""

from __future__ import annotations

import pytest

from splitfuse.engine.input_processor import InputProcessor
from splitfuse.engine.output_processor import OutputProcessor
from splitfuse.engine.protocol import EngineCoreOutput, EngineCoreOutputs
from splitfuse.outputs import Logprob, RequestOutputKind
from splitfuse.sampling_params import SamplingParams

PROMPT_IDS = [1, 56, 286]


def chosen(*logprobs: float) -> list[tuple]:
    """Core logprobs of a request that asked for logprobs=0: the chosen token's only."""
    return [(logprob, 1, [], []) for logprob in logprobs]


def step(*outputs: EngineCoreOutput, timestamp: float = 1.0) -> EngineCoreOutputs:
    return EngineCoreOutputs(outputs=list(outputs), timestamp=timestamp)


def processor_with(tiny_tokenizer, params: SamplingParams, num_sequences: int,
                   kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> OutputProcessor:
    processor = OutputProcessor(tiny_tokenizer)
    processor.add_request("r", None, PROMPT_IDS, params, [f"r#{i}" for i in range(num_sequences)], 0.0, kind)
    return processor


def test_input_processor_fans_best_of_out_with_the_chosen_tokens_logprob(tiny_tokenizer):
    inputs = InputProcessor(tiny_tokenizer, vocab_size=512, max_model_len=128, max_num_tokens_in_cache=1024)
    params = SamplingParams(n=1, best_of=3, seed=40, max_tokens=4)
    _, requests = inputs.process("r", PROMPT_IDS, params)
    assert [r.request_id for r in requests] == ["r#0", "r#1", "r#2"]
    assert [r.seed for r in requests] == [40, 41, 42]
    assert [r.prefill_leader_id for r in requests] == [None, "r#0", "r#0"]
    assert [r.sampling_params.logprobs for r in requests] == [0, 0, 0]
    assert params.logprobs is None  # the user's params are not changed
    # Asked for logprobs already: the core gets the user's params as they are.
    _, requests = inputs.process("s", PROMPT_IDS, SamplingParams(n=2, best_of=3, logprobs=2))
    assert [(r.request_id, r.sampling_params.logprobs) for r in requests] == [("s#0", 2), ("s#1", 2), ("s#2", 2)]
    # best_of == n is plain n: no logprobs added.
    _, requests = inputs.process("t", PROMPT_IDS, SamplingParams(n=2, best_of=2))
    assert [(r.request_id, r.sampling_params.logprobs) for r in requests] == [("t#0", None), ("t#1", None)]


@pytest.mark.parametrize("n, best_of, message", [
    (2, 1, "best_of must be an integer >= n (2), got 1"),
    (1, 0, "best_of must be an integer >= n (1), got 0"),
    (1, 2.0, "best_of must be an integer >= n (1), got 2.0"),
])
def test_best_of_below_n_is_refused(n, best_of, message):
    with pytest.raises(ValueError) as error:
        SamplingParams(n=n, best_of=best_of)
    assert str(error.value) == message


def test_the_n_best_by_cumulative_logprob_come_back_once_all_have_finished(tiny_tokenizer):
    processor = processor_with(tiny_tokenizer, SamplingParams(n=2, best_of=3, max_tokens=2), 3)
    first = processor.process(step(EngineCoreOutput("r#0", [280], chosen(-1.0)),
                                   EngineCoreOutput("r#1", [277], chosen(-0.5)),
                                   EngineCoreOutput("r#2", [296], chosen(-3.0))))
    assert first.request_outputs == []  # which are best is known only at the end: no output before it
    second = processor.process(step(EngineCoreOutput("r#0", [370], chosen(-1.0), finish_reason="length"),
                                    EngineCoreOutput("r#1", [286], chosen(-0.25), finish_reason="length"),
                                    EngineCoreOutput("r#2", [370], chosen(-0.5), finish_reason="length"),
                                    timestamp=2.0))
    (output,) = second.request_outputs
    assert output.finished
    # Cumulative: r#0 -2.0, r#1 -0.75, r#2 -3.5 -> r#1, then r#0, as indices 0 and 1.
    assert [(c.index, c.text, c.token_ids) for c in output.outputs] == [(0, " the", [277, 286]),
                                                                       (1, " cat", [280, 370])]
    # Logprobs were not asked for: none come back, the ranking's sums neither.
    assert [(c.logprobs, c.cumulative_logprob) for c in output.outputs] == [(None, None), (None, None)]
    assert output.metrics.num_discarded_tokens == 2  # r#2's tokens, generated all the same
    assert not processor.has_unfinished_requests()


def test_best_of_with_logprobs_returns_them_for_the_chosen_sequences(tiny_tokenizer):
    processor = processor_with(tiny_tokenizer, SamplingParams(n=1, best_of=2, max_tokens=1, logprobs=0), 2)
    (output,) = processor.process(step(EngineCoreOutput("r#0", [280], chosen(-2.0), finish_reason="length"),
                                       EngineCoreOutput("r#1", [277], chosen(-1.5), finish_reason="length"))
                                  ).request_outputs
    (completion,) = output.outputs
    assert (completion.index, completion.text, completion.cumulative_logprob) == (0, " t", -1.5)
    assert completion.logprobs == [{277: Logprob(-1.5, 1, " t")}]
    assert output.metrics.num_discarded_tokens == 1


def test_ties_go_to_the_lower_index(tiny_tokenizer):
    processor = processor_with(tiny_tokenizer, SamplingParams(n=2, best_of=4, max_tokens=1), 4)
    tokens = [(280, -2.0), (277, -1.0), (296, -1.0), (370, -0.5)]
    (output,) = processor.process(step(*(EngineCoreOutput(f"r#{i}", [token], chosen(logprob), finish_reason="length")
                                         for i, (token, logprob) in enumerate(tokens)))).request_outputs
    assert [c.text for c in output.outputs] == ["at", " t"]  # -0.5 (r#3), then -1.0: r#1 before r#2


def test_a_sequence_cut_by_a_stop_string_ranks_by_the_tokens_it_kept(tiny_tokenizer):
    processor = processor_with(tiny_tokenizer, SamplingParams(n=1, best_of=2, max_tokens=3, stop="at"), 2)
    processed = processor.process(step(
        # r#0 writes " cat" and stops there: its third token (-5.0) is dropped, so it sums to -0.5.
        EngineCoreOutput("r#0", [280, 370, 296], chosen(-0.25, -0.25, -5.0)),
        EngineCoreOutput("r#1", [277, 286, 296], chosen(-0.25, -0.25, -0.25), finish_reason="length")))
    assert processed.sequences_to_abort == ["r#0"]
    (completion,) = processed.request_outputs[0].outputs
    # r#0: -0.5 beats r#1's -0.75 (with the dropped token it would have lost at -5.5).
    assert (completion.text, completion.token_ids, completion.finish_reason, completion.stop_reason) == (
        " c", [280, 370], "stop", "at")
    assert processed.request_outputs[0].metrics.num_discarded_tokens == 3  # r#1's


def test_delta_best_of_hands_out_the_whole_text_at_the_end(tiny_tokenizer):
    processor = processor_with(tiny_tokenizer, SamplingParams(n=1, best_of=2, max_tokens=2), 2,
                               RequestOutputKind.DELTA)
    assert processor.process(step(EngineCoreOutput("r#0", [280], chosen(-1.0)),
                                  EngineCoreOutput("r#1", [277], chosen(-3.0)))).request_outputs == []
    (output,) = processor.process(step(EngineCoreOutput("r#0", [370], chosen(-1.0), finish_reason="length"),
                                       EngineCoreOutput("r#1", [286], chosen(-0.1), finish_reason="length"))
                                  ).request_outputs
    assert [(c.index, c.text, c.token_ids) for c in output.outputs] == [(0, " cat", [280, 370])]
