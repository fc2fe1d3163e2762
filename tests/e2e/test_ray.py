"""Engine cores as Ray actors (--distributed-backend ray) on a real local Ray cluster: the in-thread tokens.

One cluster for the module (2 CPUs, no dashboard); skipped where Ray is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

from splitfuse.engine.core import QueueFullError
from splitfuse.engine.llm_engine import LLMEngine
from splitfuse.engine.ray_client import RayClient
from splitfuse.engine.replica_client import ReplicatedClient
from splitfuse.config import EngineConfig
from splitfuse.entrypoints.llm import LLM
from splitfuse.sampling_params import SamplingParams

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def expected(llama_ckpt):
    prompts = random_prompts([9, 14, 5, 20], seed=4)
    return prompts, [o.outputs[0].token_ids for o in LLM(model=llama_ckpt, dtype="float32").generate(
        prompts, GREEDY, use_tqdm=False)]


def test_one_core_on_ray_answers_with_the_in_thread_tokens(llama_ckpt, expected):
    prompts, tokens = expected
    llm = LLM(model=llama_ckpt, dtype="float32", distributed_backend="ray")
    try:
        assert isinstance(llm.engine.client, RayClient)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == tokens
        stats = llm.engine.get_stats()
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        llm.engine.shutdown()


def test_two_replicas_on_ray_route_round_robin_with_the_in_thread_tokens(llama_ckpt, expected):
    prompts, tokens = expected
    llm = LLM(model=llama_ckpt, dtype="float32", distributed_backend="ray", replicas=2, routing="round-robin",
              threads_per_replica=1)
    try:
        client = llm.engine.client
        assert isinstance(client, ReplicatedClient) and all(isinstance(r, RayClient) for r in client.replicas)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == tokens
        assert [r.stats().prompt_tokens_total for r in client.replicas] == [9 + 5, 14 + 20]
    finally:
        llm.engine.shutdown()


def test_a_refusal_in_the_actor_is_the_same_error_here(llama_ckpt):
    engine = LLMEngine(EngineConfig.from_kwargs(model=llama_ckpt, dtype="float32", distributed_backend="ray",
                                                max_waiting_requests=1))
    try:
        with pytest.raises(QueueFullError, match=r"^the waiting queue is full \(1 requests\)$"):
            engine.add_request("pair", random_prompts([8])[0], SamplingParams(n=2, max_tokens=2))
        assert not engine.has_unfinished_requests()
    finally:
        engine.shutdown()


def test_a_killed_actor_fails_over_to_the_other_replica_with_the_same_greedy_tokens(llama_ckpt):
    prompts = random_prompts([12, 7, 19, 9], seed=5)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(model=llama_ckpt, dtype="bfloat16").generate(
        prompts, params, use_tqdm=False)]
    llm = LLM(model=llama_ckpt, dtype="bfloat16", distributed_backend="ray", replicas=2, routing="round-robin",
              threads_per_replica=1)
    try:
        engine, client = llm.engine, llm.engine.client
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        finished, steps = {}, 0
        while len(finished) < len(prompts):
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output.outputs[0].token_ids
            steps += 1
            if steps == 3:
                ray.kill(client.replicas[1]._actor)
        assert [finished[f"r{i}"] for i in range(len(prompts))] == want
        assert client.num_failovers == 2
    finally:
        llm.engine.shutdown()
