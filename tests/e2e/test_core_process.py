"""The engine core in its own process (``core_process=True``): same tokens as in-thread, errors across, no orphans.

Real child processes and real ZeroMQ sockets on the tiny llama checkpoint. Each child start
imports torch (seconds), so one MP engine serves most tests.
"""

import multiprocessing
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from splitfuse.config import EngineConfig
from splitfuse.engine.core import QueueFullError
from splitfuse.engine.core_client import EngineCoreStepError, MPClient
from splitfuse.engine.llm_engine import LLMEngine, NewRequest
from splitfuse.engine.protocol import EngineCoreRequest
from splitfuse.entrypoints.llm import LLM
from splitfuse.outputs import RequestOutput
from splitfuse.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def random_prompts(lengths, seed=0, vocab_size=512):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def in_thread(llama_ckpt):
    return LLM(model=llama_ckpt, dtype="float32")


@pytest.fixture(scope="module")
def in_process(llama_ckpt):
    llm = LLM(model=llama_ckpt, dtype="float32", core_process=True)
    yield llm
    llm.engine.shutdown()


def completions(outputs: list[RequestOutput]) -> list[list[tuple]]:
    return [[(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan's zombie may never be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until_gone(pid: int, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not is_running(pid)


# -- same answers as in-thread ------------------------------------------------------------------------

def test_greedy_tokens_and_text_are_the_in_thread_ones(in_thread, in_process):
    prompts = random_prompts([5, 17, 9, 30, 3], seed=1) + ["Hello there, engine"]
    expected = in_thread.generate(prompts, GREEDY, use_tqdm=False)
    assert completions(in_process.generate(prompts, GREEDY, use_tqdm=False)) == completions(expected)


def test_n_choices_with_seeds_are_the_in_thread_ones(in_thread, in_process):
    prompts = random_prompts([8, 21], seed=2)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    expected = in_thread.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs) for o in expected] == [3, 3]
    assert completions(in_process.generate(prompts, params, use_tqdm=False)) == completions(expected)


def test_stop_string_ends_the_sequence_in_the_frontend_as_in_thread(in_thread, in_process):
    prompt = random_prompts([11], seed=3)[0]
    full = in_thread.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 3: len(full.text) // 3 + 2]
    assert len(stop) == 2 and stop in full.text
    # The core keeps generating until the frontend's abort reaches it; the frontend cuts at the stop string.
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    expected = in_thread.generate(prompt, params, use_tqdm=False)
    assert (expected[0].outputs[0].finish_reason, expected[0].outputs[0].stop_reason) == ("stop", stop)
    assert completions(in_process.generate(prompt, params, use_tqdm=False)) == completions(expected)


def test_logprobs_are_the_in_thread_ones(in_thread, in_process):
    params = GREEDY.clone(logprobs=3)
    prompt = random_prompts([13], seed=4)[0]
    alone = in_thread.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert in_process.generate(prompt, params, use_tqdm=False)[0].outputs[0].logprobs == alone.logprobs
    # In a batch, the child starts stepping the first prompt while the frontend still adds the others,
    # so its batches are composed differently; float32 CPU matmuls round by row count (not batch-invariant).
    prompts = random_prompts([6, 19, 10], seed=5)
    expected = in_thread.generate(prompts, params, use_tqdm=False)
    got = in_process.generate(prompts, params, use_tqdm=False)
    assert completions(got) == completions(expected)
    for got_output, expected_output in zip(got, expected):
        assert ranked_tokens(got_output) == ranked_tokens(expected_output)
        assert logprob_values(got_output) == pytest.approx(logprob_values(expected_output), abs=1e-5)


def ranked_tokens(output: RequestOutput) -> list[dict]:
    return [{t: (p.rank, p.decoded_token) for t, p in position.items()} for position in output.outputs[0].logprobs]


def logprob_values(output: RequestOutput) -> list[float]:
    return [p.logprob for position in output.outputs[0].logprobs for p in position.values()]


# -- blocks, errors ----------------------------------------------------------------------------------

def step_until_finished(engine: LLMEngine, request_id: str) -> RequestOutput:
    while True:
        for output in engine.step():
            if output.request_id == request_id and output.finished:
                return output


def test_abort_frees_the_blocks_by_the_next_step(in_process):
    engine = in_process.engine
    long_prompt, short_prompt = random_prompts([40, 7], seed=6)
    engine.add_request("abort-long", long_prompt, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    engine.add_request("abort-short", short_prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    step_until_finished(engine, "abort-short")
    stats = engine.get_stats()
    assert stats.num_running == 1 and stats.num_free_blocks < stats.num_total_blocks
    engine.abort_request("abort-long")
    assert not engine.has_unfinished_requests()
    # Steps the child ran before the abort reached it come first; after the abort it steps once more.
    while engine.get_stats().num_free_blocks < stats.num_total_blocks:
        assert engine.step() == []
    stats = engine.get_stats()
    assert (stats.num_running, stats.num_waiting, stats.num_free_blocks) == (0, 0, stats.num_total_blocks)


def test_a_failed_step_aborts_its_requests_and_the_core_serves_on(in_process):
    client = in_process.engine.client
    # A token id past the vocabulary passes the core (the frontend checks ids) and fails in the embedding.
    client.add_requests([EngineCoreRequest("poison", [3, 100_000], SamplingParams(max_tokens=2), 0.0, 2)])
    with pytest.raises(EngineCoreStepError, match="the engine failed while running this request") as raised:
        while True:
            client.get_output()
    assert raised.value.request_ids == ["poison"]
    assert client.stats().num_running == 0
    prompts = random_prompts([9], seed=7)
    assert completions(in_process.generate(prompts, GREEDY, use_tqdm=False))[0][0][1]


def test_several_adds_go_out_together_and_each_gets_its_own_answer(in_thread, in_process):
    prompts = random_prompts([11, 6], seed=9)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    errors = in_process.engine.add_requests([
        NewRequest("batch-a", prompts[0], params), NewRequest("batch-a", prompts[1], params),
        NewRequest("batch-empty", [], params), NewRequest("batch-b", prompts[1], params)])
    assert [None if e is None else str(e) for e in errors] == [
        None, "request id 'batch-a' is already in use", "prompt is empty", None]
    finished = {}
    while len(finished) < 2:
        for output in in_process.engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    expected = [o.outputs[0].token_ids for o in in_thread.generate(prompts, params, use_tqdm=False)]
    assert [finished["batch-a"], finished["batch-b"]] == expected
    # Refusals by the core itself, one group among others in the same exchange.
    client = in_process.engine.client
    running = EngineCoreRequest("group-running", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), 0.0, 200)
    client.add_requests([running])
    other = EngineCoreRequest("group-other", [8, 9], SamplingParams(max_tokens=2, ignore_eos=True), 0.0, 2)
    results = client.add_request_groups([[other], [running]])
    assert results[0] is None and str(results[1]) == "request id 'group-running' is already in use"
    client.abort_requests(["group-running", "group-other"])


@pytest.fixture(scope="module")
def one_waiting_slot(llama_ckpt):
    engine = LLMEngine(EngineConfig.from_kwargs(model=llama_ckpt, dtype="float32", core_process=True,
                                                max_waiting_requests=1))
    yield engine
    engine.shutdown()


def test_queue_full_in_the_child_is_queue_full_here_with_nothing_queued(one_waiting_slot):
    engine = one_waiting_slot
    prompt = random_prompts([12], seed=8)[0]
    # Two sequences for one slot: refused whatever the core is doing. (A second single request would race
    # with the child, which starts the first one as soon as it is added.)
    with pytest.raises(QueueFullError, match=r"^the waiting queue is full \(1 requests\)$"):
        engine.add_request("full", prompt, SamplingParams(n=2, temperature=0, max_tokens=3))
    assert not engine.has_unfinished_requests()
    # The same id is free, and the core counts one prompt: the refused pair left nothing behind.
    engine.add_request("full", prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(step_until_finished(engine, "full").outputs[0].token_ids) == 3
    stats = engine.get_stats()
    assert (stats.prompt_tokens_total, stats.num_free_blocks) == (12, stats.num_total_blocks)


def test_a_value_error_in_the_child_is_a_value_error_here(one_waiting_slot):
    client = one_waiting_slot.client
    params = SamplingParams(max_tokens=200, ignore_eos=True)  # still running when it comes again
    request = EngineCoreRequest("twice", [5, 6, 7], params, 0.0, 200)
    client.add_requests([request])
    with pytest.raises(ValueError, match=r"^request id 'twice' is already in use$") as raised:
        client.add_requests([request])
    assert type(raised.value) is ValueError
    client.abort_requests(["twice"])


# -- start-up and shutdown ---------------------------------------------------------------------------

def test_a_model_the_child_cannot_load_raises_in_the_parent_with_the_childs_message(tmp_path, llama_ckpt):
    children_before = multiprocessing.active_children()
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"failed to start: model '.*missing' is neither a checkpoint"):
        MPClient(EngineConfig.from_kwargs(model=missing, dtype="float32"))
    # Config and tokenizer load in the parent; only the child reads the weights.
    no_weights = shutil.copytree(llama_ckpt, tmp_path / "no_weights",
                                 ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    with pytest.raises(FileNotFoundError, match=r"failed to start: no \*\.safetensors files in"):
        LLM(model=str(no_weights), dtype="float32", core_process=True)
    assert multiprocessing.active_children() == children_before  # both failed children were reaped


def test_shutdown_stops_the_child_and_is_idempotent(llama_ckpt):
    client = MPClient(EngineConfig.from_kwargs(model=llama_ckpt, dtype="float32"))
    pid = client.pid
    assert is_running(pid) and pid in [p.pid for p in multiprocessing.active_children()]
    client.shutdown()
    assert not is_running(pid) and pid not in [p.pid for p in multiprocessing.active_children()]
    client.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        client.abort_requests(["x"])


_PARENT = """
import sys, time
from splitfuse.config import EngineConfig
from splitfuse.engine.core_client import MPClient
if __name__ == "__main__":
    client = MPClient(EngineConfig.from_kwargs(model=sys.argv[1], dtype="float32"))
    print(client.pid, flush=True)
    time.sleep(120)
"""


def test_the_child_exits_when_its_parent_is_killed(tmp_path, llama_ckpt):
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), llama_ckpt], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert is_running(child_pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert wait_until_gone(child_pid)
