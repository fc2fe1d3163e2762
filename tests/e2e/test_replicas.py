"""--replicas N: engine cores in their own processes behind one frontend, routed per request; real processes.

The replicated engine answers with the in-thread engine's tokens, spreads requests as its policy
says, learns each replica's cached prefixes from its KV events, and frees aborted requests on the
replica that holds them.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from splitfuse.engine.replica_client import ReplicatedClient, replica_cpu_sets
from splitfuse.entrypoints.llm import LLM
from splitfuse.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(180)

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_cpu_sets_split_the_cores_evenly_in_order():
    assert replica_cpu_sets(2, None, available=[0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert replica_cpu_sets(2, 1, available=[4, 5]) == [[4], [5]]
    assert replica_cpu_sets(3, None, available=[0, 1]) == [[0], [1], [0]]  # more replicas than cores: shared
    assert replica_cpu_sets(2, 2, available=[0, 1]) == [[0, 1], [0, 1]]


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def in_thread(llama_ckpt):
    return LLM(model=llama_ckpt, dtype="float32")


@pytest.fixture(scope="module")
def round_robin(llama_ckpt):
    llm = LLM(model=llama_ckpt, dtype="float32", replicas=2, routing="round-robin")
    yield llm
    llm.engine.shutdown()


def test_two_replicas_answer_with_the_in_thread_tokens_and_alternate(in_thread, round_robin):
    prompts = random_prompts([9, 14, 5, 20, 11], seed=1)
    client = round_robin.engine.client
    assert isinstance(client, ReplicatedClient) and len(client.replicas) == 2
    expected = [o.outputs[0].token_ids for o in in_thread.generate(prompts, GREEDY, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in round_robin.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == expected
    assert client.decisions == {"round_robin": 5}
    # Alternating, from replica 0: it took prompts 0, 2 and 4, replica 1 prompts 1 and 3.
    assert [c.stats().prompt_tokens_total for c in client.replicas] == [9 + 5 + 11, 14 + 20]


def test_an_abort_frees_the_blocks_on_its_replica(round_robin):
    engine = round_robin.engine
    engine.add_request("abort-me", random_prompts([30])[0], SamplingParams(max_tokens=300, ignore_eos=True))
    engine.step()
    assert engine.get_stats().num_running == 1
    engine.abort_request("abort-me")
    client = engine.client
    assert client._owner == {} and client._in_flight == [0, 0]
    for replica in client.replicas:  # each child steps once after an abort; wait for it to show
        for _ in range(100):
            stats = replica.stats()
            if stats.num_free_blocks == stats.num_total_blocks:
                break
            time.sleep(0.05)
        assert (stats.num_running, stats.num_free_blocks) == (0, stats.num_total_blocks)


def test_cache_aware_sends_a_shared_prefix_where_its_blocks_are(llama_ckpt, in_thread):
    llm = LLM(model=llama_ckpt, dtype="float32", replicas=2, routing="cache-aware", block_size=4)
    try:
        document = random_prompts([40], seed=2)[0]
        llm.generate([document + [7, 8]], GREEDY, use_tqdm=False)
        client = llm.engine.client
        owner_stats = [c.stats().prompt_tokens_total for c in client.replicas]
        owner = owner_stats.index(max(owner_stats))
        questions = [document + [9 + i, 10 + i] for i in range(4)]
        outputs = llm.generate(questions, GREEDY, use_tqdm=False)  # one at a time would be the same place
        after = [c.stats() for c in client.replicas]
        # Every question went to the replica holding the document's blocks, and hit them.
        assert after[1 - owner].prompt_tokens_total == 0
        assert after[owner].prefix_cache_hits >= 4 * 40
        assert client.decisions["cache_hit"] >= 1
        expected = in_thread.generate(questions, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    finally:
        llm.engine.shutdown()


def test_a_killed_replica_fails_over_mid_stream_with_the_same_greedy_tokens_and_comes_back(llama_ckpt):
    # bf16 on the CPU kernels is batch invariant: recomputing prompt + tokens so far elsewhere gives the
    # tokens the dead replica would have given.
    prompts = random_prompts([12, 7, 19, 9], seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(model=llama_ckpt, dtype="bfloat16").generate(
        prompts, params, use_tqdm=False)]
    llm = LLM(model=llama_ckpt, dtype="bfloat16", replicas=2, routing="round-robin")
    try:
        engine, client = llm.engine, llm.engine.client
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        finished, steps = {}, 0
        victim = client.replicas[1]
        while len(finished) < len(prompts):
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output.outputs[0]
            steps += 1
            if steps == 3:  # its requests have streamed a few tokens by now
                os.kill(victim.pid, signal.SIGKILL)
        assert [finished[f"r{i}"].token_ids for i in range(len(prompts))] == expected
        assert all(c.finish_reason == "length" for c in finished.values())
        assert client.num_failovers == 2 and client._owner == {}
        for _ in range(300):  # the replica starts again by itself
            if all(client.healthy):
                break
            engine.add_request("probe", prompts[0], SamplingParams(temperature=0, max_tokens=1))
            while engine.has_unfinished_requests():
                engine.step()
            time.sleep(0.1)
        assert client.healthy == [True, True] and client.replicas[1].pid != victim.pid
    finally:
        llm.engine.shutdown()


def test_splitfuse_serve_with_two_replicas_streams_and_reports_them(llama_ckpt):
    import httpx
    from server_process import serve_process

    with serve_process(llama_ckpt, "--dtype", "float32", "--replicas", "2", "--routing", "round-robin",
                       "--served-model-name", "tiny") as url:
        assert httpx.get(url + "/health").json() == {"status": "ok", "replicas": {"replica-0": "up",
                                                                                 "replica-1": "up"}}
        body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        texts = [httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
                 for _ in range(2)]  # one on each replica: the same greedy text
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
            chunks = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert chunks[-1] == "[DONE]"
        streamed = "".join(json.loads(chunk)["choices"][0]["text"] for chunk in chunks[:-1])
        assert texts[0] == texts[1] == streamed and len(texts[0]) > 0
        metrics = httpx.get(url + "/metrics").text
        assert 'splitfuse:replica_up{replica="replica-0"} 1.0' in metrics
        assert 'splitfuse:replica_up{replica="replica-1"} 1.0' in metrics
        assert 'splitfuse:routing_decisions_total{reason="round_robin"} 3.0' in metrics


def test_session_routing_keeps_each_tenant_on_one_replica(llama_ckpt):
    from splitfuse.router.policies import rendezvous_weight

    llm = LLM(model=llama_ckpt, dtype="float32", replicas=2, routing="session")
    try:
        engine, client = llm.engine, llm.engine.client
        tenants = ["alice", "bob", "carol", "alice", "bob", "carol"]
        owners = []
        for i, tenant in enumerate(tenants):
            engine.add_request(f"s{i}", random_prompts([6], seed=i)[0], GREEDY, tenant=tenant)
            owners.append(client._owner[f"s{i}"])
        while engine.has_unfinished_requests():
            engine.step()
        assert owners[:3] == owners[3:]  # each tenant's second request went where its first did
        # ... which is the replica rendezvous hashing ranks first for that tenant.
        assert owners[:3] == [max((0, 1), key=lambda r: rendezvous_weight(t, client.replica_ids[r]))
                              for t in tenants[:3]]
        assert client.decisions == {"session": 6}
    finally:
        llm.engine.shutdown()
