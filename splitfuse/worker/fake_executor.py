"""FakeExecutor: an ``Executor`` without a model — checks each step, draws tokens by rule, advances a virtual clock.

It keeps the runner's persistent copies with the same ``update_states`` the real runner uses,
so every test and simulation driven through it exercises the ``SchedulerOutput`` diff protocol
(``splitfuse/step.py``), and it refuses a step the real runner could not run (a request it does
not hold, tokens it does not know, a wrong set of sampling requests) with a ``RuntimeError``
naming the violation. Tokens come from a deterministic rule of each request's known tokens, so
a preempted request that is recomputed draws exactly what it would have drawn without preemption.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from splitfuse.clock import VirtualClock
from splitfuse.step import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from splitfuse.worker.input_batch import RequestState, update_states

# The tiny test vocabulary (checkpoint_factory.TINY_VOCAB_SIZE), the usual partner of this executor.
DEFAULT_VOCAB_SIZE = 512
# What a request that asks for logprobs gets: the chosen token is rank 1 at this logprob, and the
# top-k are the chosen token and the ones after it, each 1.0 lower: k=2, token 9 -> ids [9, 10], [-1.0, -2.0].
FAKE_LOGPROB = -1.0

NextToken = Callable[[list[int], int], int]  # (known token ids, vocab size) -> the next token
StepTime = Callable[[int, int], float]  # (tokens scheduled, requests scheduled) -> seconds


def default_next_token(token_ids: list[int], vocab_size: int) -> int:
    """``(last_token * 7 + len(token_ids)) % vocab_size``: [5, 6, 7] -> (7 * 7 + 3) % 512 = 52.

    A function of the known tokens only (not of the request id or the step), so equal
    sequences draw equal tokens, and the length term keeps a sequence from sticking on one token.
    """
    return (token_ids[-1] * 7 + len(token_ids)) % vocab_size


def default_step_time_s(num_scheduled_tokens: int, num_requests: int) -> float:
    """1 ms per step + 0.1 ms per scheduled token: a placeholder the simulator's measured cost model will replace."""
    return 1e-3 + 1e-4 * num_scheduled_tokens


class FakeExecutor:
    """Runs steps on the runner's copies of the requests, with no forward pass.

    ``next_token`` is a rule (``NextToken``) or a script: ``{request_id: [tokens...]}``, where
    a request's i-th output token is its script's i-th entry (a request that is not scripted,
    or samples past its script's end, fails the step). ``block_size``, when given, also checks
    that each scheduled request's block table has room for the KV it computes.
    Every step's ``SchedulerOutput`` is kept in ``scheduler_outputs``; ``plans`` are their
    ``num_scheduled_tokens`` for the steps that computed tokens.
    """

    def __init__(self, clock: VirtualClock, *, next_token: Union[NextToken, dict[str, list[int]]] = default_next_token,
                 step_time_s: StepTime = default_step_time_s, vocab_size: int = DEFAULT_VOCAB_SIZE,
                 block_size: Optional[int] = None) -> None:
        self.clock = clock
        self.next_token = next_token
        self.step_time_s = step_time_s
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.requests: dict[str, RequestState] = {}
        self.scheduler_outputs: list[SchedulerOutput] = []

    @property
    def plans(self) -> list[dict[str, int]]:
        """Request id -> tokens computed, per step that computed any, in scheduling order."""
        return [dict(output.num_scheduled_tokens) for output in self.scheduler_outputs if not output.is_empty]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.scheduler_outputs.append(scheduler_output)
        try:
            update_states(self.requests, scheduler_output)
        except ValueError as error:
            raise RuntimeError(str(error)) from error
        if scheduler_output.is_empty:
            return ModelRunnerOutput()
        self._check_step(scheduler_output)
        output = ModelRunnerOutput()
        for request_id in scheduler_output.sampling_request_ids:
            state = self.requests[request_id]
            token_id = self._draw(state)
            output.request_ids.append(request_id)
            output.sampled_token_ids.append([token_id])
            output.logprobs.append(self._fake_logprobs(state, token_id))
        self.clock.advance(self.step_time_s(scheduler_output.total_num_scheduled_tokens,
                                            len(scheduler_output.num_scheduled_tokens)))
        return output

    def _check_step(self, scheduler_output: SchedulerOutput) -> None:
        """Raises RuntimeError naming the first thing the real runner could not do with this step."""
        should_sample = set()
        for request_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            state = self.requests.get(request_id)
            if state is None or not state.block_table:  # a preempted request holds no blocks until it is new again
                raise RuntimeError(f"step schedules {request_id!r}, which the runner does not hold")
            end = state.num_computed_tokens + num_scheduled
            if num_scheduled < 1 or end > len(state.all_token_ids):
                raise RuntimeError(f"step schedules {num_scheduled} tokens of {request_id!r} from "
                                   f"{state.num_computed_tokens} on, but the runner knows {len(state.all_token_ids)}")
            if self.block_size is not None and end > len(state.block_table) * self.block_size:
                raise RuntimeError(f"{request_id!r} computes up to token {end}, but its blocks "
                                   f"{state.block_table} hold {len(state.block_table) * self.block_size}")
            if end == len(state.all_token_ids):
                should_sample.add(request_id)
        sampling = scheduler_output.sampling_request_ids
        if len(set(sampling)) != len(sampling) or set(sampling) != should_sample:
            raise RuntimeError(f"sampling requests {sorted(sampling)} are not those whose known tokens "
                               f"are all computed this step: {sorted(should_sample)}")

    def _draw(self, state: RequestState) -> int:
        if callable(self.next_token):
            return self.next_token(state.all_token_ids, self.vocab_size)
        script = self.next_token.get(state.request_id)
        index = len(state.output_token_ids)
        if script is None or index >= len(script):
            raise RuntimeError(f"{state.request_id!r} samples its output token {index}, "
                               f"but its script has {0 if script is None else len(script)}")
        return script[index]

    def _fake_logprobs(self, state: RequestState, token_id: int) -> Optional[list[TokenLogprobs]]:
        num_top = state.params.logprobs
        if num_top is None:
            return None
        top_ids = [(token_id + rank) % self.vocab_size for rank in range(num_top)]
        top_logprobs = [FAKE_LOGPROB - rank for rank in range(num_top)]
        return [(FAKE_LOGPROB, 1, top_ids, top_logprobs)]

    def shutdown(self) -> None:
        pass
