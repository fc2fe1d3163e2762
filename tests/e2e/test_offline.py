"""The offline LLM API end to end on tiny checkpoints: memory pressure, prefix caching, sampling, bad input."""

import json
import os
import shutil

import pytest
import torch

from splitfuse.entrypoints.llm import LLM
from splitfuse.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def random_prompts(lengths, seed=0, vocab_size=512):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    return LLM(model=llama_ckpt, dtype="float32", max_num_batched_tokens=32, block_size=4)


def skip_without_amx():
    from splitfuse.platforms import resolve_platform

    if not resolve_platform(torch.device("cpu"), torch.bfloat16).uses_amx:
        pytest.skip("no AMX on this CPU (or SPLITFUSE_DISABLE_AMX is set)")


def assert_idle(llm):
    stats = llm.engine.get_stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not llm.engine.has_unfinished_requests()


def test_tiny_kv_pool_finishes_everything_with_the_same_output(llama_ckpt, llm):
    prompts = random_prompts([20, 25, 18, 30, 22, 27], seed=3)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    # 12 blocks x 4 tokens: room for one request and a bit (each needs 8-11 blocks).
    small = LLM(model=llama_ckpt, dtype="float32", max_num_batched_tokens=32, block_size=4,
                num_gpu_blocks_override=12)
    outputs = small.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert small.engine.get_stats().num_preemptions > 0
    assert_idle(small)


def test_second_request_over_a_shared_prefix_computes_only_the_suffix(llama_ckpt):
    llm = LLM(model=llama_ckpt, dtype="float32", block_size=4)
    prefix = random_prompts([32], seed=5)[0]
    first, second = prefix + [11, 12, 13], prefix + [21, 22, 23, 24, 25]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(first, params, use_tqdm=False)
    before = llm.engine.get_stats().computed_tokens_total
    output = llm.generate(second, params, use_tqdm=False)[0]
    assert output.num_cached_tokens == 32
    assert llm.engine.get_stats().computed_tokens_total - before == 5


def test_seeded_sampling_is_the_same_whatever_else_is_in_the_batch(llm):
    target = random_prompts([9], seed=7)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = llm.generate(target, params, use_tqdm=False)[0].outputs[0].token_ids
    others = random_prompts([5, 30, 14], seed=8)
    noisy = SamplingParams(temperature=1.3, max_tokens=10, ignore_eos=True)
    batch = llm.generate(others[:2] + [target] + others[2:], [noisy, noisy, params, noisy], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    different_seed = llm.generate(target, params.clone(seed=99), use_tqdm=False)[0].outputs[0].token_ids
    assert different_seed != alone


def test_top_k_one_is_greedy_and_min_p_one_keeps_only_the_argmax(llm):
    prompts = random_prompts([6, 13], seed=9)
    greedy = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    for params in (SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True),
                   SamplingParams(temperature=1.5, min_p=1.0, max_tokens=12, ignore_eos=True)):
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == greedy


def test_stop_string_is_cut_from_the_text(llm):
    prompt = random_prompts([8], seed=11)[0]
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[:full.text.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=stop, ignore_eos=True,
                                               include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[:full.text.index(stop) + 3]


def test_text_of_multibyte_output_equals_the_full_decode(byte_fallback_ckpt):
    llm = LLM(model=byte_fallback_ckpt, dtype="float32")
    outputs = llm.generate(["héllo wörld 你好", "🙂 ∑ x"], SamplingParams(temperature=0.8, seed=3, max_tokens=40,
                                                                         ignore_eos=True), use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        assert completion.text == llm.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_stop_token_ids_min_tokens_and_length(llm):
    prompt = random_prompts([10], seed=12)[0]
    full = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop_token = full.token_ids[4]
    first_at = full.token_ids.index(stop_token)
    stopped = llm.generate(prompt, GREEDY.clone(stop_token_ids=[stop_token], ignore_eos=False),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == full.token_ids[:first_at + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_token)
    late = llm.generate(prompt, GREEDY.clone(stop_token_ids=[stop_token], min_tokens=first_at + 2),
                        use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) > first_at + 1


def test_n_siblings_share_the_prompt_and_differ_when_sampling(llm):
    before = llm.engine.get_stats().prefix_cache_hits
    prompt = random_prompts([21], seed=13)[0]
    output = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)[0]
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in output.outputs}) == 3
    # Siblings 1 and 2 each found the leader's 5 full prompt blocks (20 tokens) in the cache.
    assert llm.engine.get_stats().prefix_cache_hits - before >= 2 * 20
    greedy = llm.generate(prompt, GREEDY.clone(n=2), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert_idle(llm)


def test_outputs_carry_logprobs_and_timings(llm):
    output = llm.generate(random_prompts([7], seed=14)[0], GREEDY.clone(logprobs=2), use_tqdm=False)[0]
    completion = output.outputs[0]
    assert len(completion.logprobs) == 12
    assert all(len(entry) in (2, 3) for entry in completion.logprobs)
    assert completion.cumulative_logprob == pytest.approx(
        sum(entry[t].logprob for entry, t in zip(completion.logprobs, completion.token_ids)))
    metrics = output.metrics
    assert metrics.arrival_time <= metrics.first_token_time <= metrics.finished_time


def test_chat_applies_the_template(llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    output = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    rendered = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert output.prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)
    assert len(output.outputs[0].token_ids) == 12


@pytest.mark.parametrize("prompt, params, error", [
    ("", GREEDY, "prompt is empty"),
    ([], GREEDY, "prompt is empty"),
    ([5, 999999], GREEDY, "token id 999999 is outside the vocabulary"),
    ([5] * 600, GREEDY, "prompt has 600 tokens, but the model's context length"),
    ([5] * 500, GREEDY.clone(max_tokens=100), r"prompt \(500 tokens\) \+ max_tokens \(100\) = 600 exceeds"),
    ([5, 6], GREEDY.clone(logit_bias={100000: 1.0}), "token id 100000 is outside the vocabulary"),
])
def test_bad_input_raises_and_leaves_the_engine_usable(llm, prompt, params, error):
    with pytest.raises(ValueError, match=error):
        llm.generate([[7, 8, 9], prompt], params, use_tqdm=False)
    assert_idle(llm)
    assert len(llm.generate([7, 8, 9], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 12


@pytest.mark.parametrize("kwargs, error", [
    (dict(temperature=-1), "temperature must be in"),
    (dict(top_p=0), "top_p must be in"),
    (dict(top_k=-5), "top_k must be"),
    (dict(n=0), "n must be an integer"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens .5. must be <= max_tokens .2."),
    (dict(logprobs=99), "logprobs must be an integer in"),
    (dict(stop=[""]), "stop strings must be non-empty"),
    (dict(seed=1 << 70), "seed must be a signed 64-bit integer"),
])
def test_invalid_sampling_values_name_the_field(kwargs, error):
    with pytest.raises(ValueError, match=error):
        SamplingParams(**kwargs)


def test_unknown_architecture_and_missing_files(llama_ckpt, tmp_path):
    unknown = tmp_path / "unknown"
    shutil.copytree(llama_ckpt, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (unknown / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'FooForCausalLM'"):
        LLM(model=str(unknown))

    no_weights = tmp_path / "no_weights"
    shutil.copytree(llama_ckpt, no_weights)
    for name in os.listdir(no_weights):
        if name.endswith(".safetensors"):
            os.remove(no_weights / name)
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors files"):
        LLM(model=str(no_weights))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(model=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is neither a checkpoint directory, a .gguf file, nor a "
                                                "built-in name \\(smollm2-135m-instruct, demo-random\\)"):
        LLM(model=str(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="unknown engine argument.*block_sise"):
        LLM(model=llama_ckpt, block_sise=16)


@pytest.mark.parametrize("ckpt_name", ["llama_ckpt", "mixtral_ckpt"])
def test_bf16_on_cpu_pads_each_step_to_a_precompiled_row_count(ckpt_name, request, monkeypatch):
    from splitfuse.platforms.cpu.kernels import CpuKernels
    from splitfuse.platforms.cpu.linear import PackedLinear, packing_supported, padded_rows

    if not packing_supported(torch.device("cpu"), torch.bfloat16):
        pytest.skip("oneDNN bf16 weight packing unavailable")
    monkeypatch.setattr(CpuKernels, "amx_takes", lambda self, weight: False)  # oneDNN layers, even on AMX CPUs
    # Padding is the speed mode's (batch invariance runs oneDNN at one row count, tests/models/test_batch_invariance.py).
    bf16 = LLM(model=request.getfixturevalue(ckpt_name), dtype="bfloat16", max_num_batched_tokens=40,
               block_size=4, device="cpu", enable_prefix_caching=False, batch_invariant=False)
    model = bf16.engine.engine_core.executor.runner.model
    assert model.pads_rows and isinstance(model.packed_logits, PackedLinear)
    seen_rows = []
    forward = model.forward

    def recording_forward(input_ids, positions, kv_caches, attn_metadata):
        seen_rows.append((input_ids.shape[0], positions.shape[0], attn_metadata.slot_mapping.shape[0]))
        return forward(input_ids, positions, kv_caches, attn_metadata)

    model.forward = recording_forward
    prompts = random_prompts([11, 23, 5], seed=4)
    first = [o.outputs[0].token_ids for o in bf16.generate(prompts, GREEDY, use_tqdm=False)]
    # Every step ran at the padded row count of its real token count (11 + 23 + 5 = 39 tokens of
    # prompt over budgets of 40, then 3 decodes a step); none of the padding reached the KV cache.
    assert seen_rows[0] == (padded_rows(39), padded_rows(39), 39) == (40, 40, 39)
    assert all(rows == positions == padded_rows(tokens) for rows, positions, tokens in seen_rows)
    assert [len(tokens) for tokens in first] == [12, 12, 12]
    assert_idle(bf16)
    # Same batch, same steps, same padding and kernels: the same tokens again. (bf16 results do depend
    # on a matmul's row count, so a different batch, or prefix-cache hits, may change late tokens.)
    assert [o.outputs[0].token_ids for o in bf16.generate(prompts, GREEDY, use_tqdm=False)] == first


# Linear layers of the tiny 2-layer models: qkv, o, gate_up and down (Mixtral: qkv, o and the router) + lm_head.
@pytest.mark.parametrize("ckpt_name, num_linears", [("llama_ckpt", 2 * 4 + 1), ("mixtral_ckpt", 2 * 3 + 1)])
def test_bf16_on_an_amx_cpu_runs_every_linear_layer_on_the_amx_kernel_at_the_exact_row_count(ckpt_name, num_linears,
                                                                                              request):
    from splitfuse.platforms.cpu.linear import AmxLinear, PackedLinear

    skip_without_amx()
    bf16 = LLM(model=request.getfixturevalue(ckpt_name), dtype="bfloat16", max_num_batched_tokens=40,
               block_size=4, device="cpu", enable_prefix_caching=False)
    model = bf16.engine.engine_core.executor.runner.model
    kinds = [type(m) for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear, AmxLinear))]
    assert kinds == [AmxLinear] * num_linears and not model.pads_rows
    seen_rows = []
    forward = model.forward

    def recording_forward(input_ids, positions, kv_caches, attn_metadata):
        seen_rows.append((input_ids.shape[0], attn_metadata.slot_mapping.shape[0]))
        return forward(input_ids, positions, kv_caches, attn_metadata)

    model.forward = recording_forward
    prompts = random_prompts([11, 23, 5], seed=4)
    first = [o.outputs[0].token_ids for o in bf16.generate(prompts, GREEDY, use_tqdm=False)]
    # No dummy tokens: the AMX kernel compiles nothing, so every step runs at its real token count.
    assert seen_rows[0] == (39, 39) and all(rows == tokens for rows, tokens in seen_rows)
    assert [len(tokens) for tokens in first] == [12, 12, 12]
    assert_idle(bf16)
    assert [o.outputs[0].token_ids for o in bf16.generate(prompts, GREEDY, use_tqdm=False)] == first


# llama: GQA; llama_mha; mistral: a sliding window (8) shorter than the prompts; qwen2: qkv biases.
@pytest.mark.parametrize("ckpt_name", ["llama_ckpt", "llama_mha_ckpt", "mistral_ckpt", "qwen2_ckpt"])
def test_the_fused_cpu_decoder_gives_the_python_layers_results_bit_for_bit(ckpt_name, request):
    skip_without_amx()
    # No prefix caching: the second run must schedule the same steps.
    llm = LLM(model=request.getfixturevalue(ckpt_name), dtype="bfloat16", max_num_batched_tokens=40,
              block_size=4, device="cpu", enable_prefix_caching=False)
    model = llm.engine.engine_core.executor.runner.model
    decoder = model.cpu_decoder
    assert decoder is not None
    fused_steps = []
    run = decoder.run
    decoder.run = lambda *args: fused_steps.append(args[0].shape[0]) or run(*args)
    # Short prompts and a 30-token one: with batch invariance (the default) every chunk is the kernel's.
    prompts = random_prompts([11, 30, 5, 9], seed=8)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)

    def outputs():
        results = llm.generate(prompts, params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in results]

    fused = outputs()
    # Every step ran fused: the 40-token budget's prompt steps, then the decodes.
    assert fused_steps == [40, 16] + [4] * 14 + [3]
    model.cpu_decoder = None
    python = outputs()
    # The same kernels with the same arguments in the same order: equal tokens and equal logprobs.
    assert fused == python
    assert_idle(llm)


@pytest.mark.parametrize("ckpt_name", ["qwen3_ckpt", "mixtral_ckpt"])
def test_q_k_norms_and_moe_keep_the_python_layers(ckpt_name, request):
    llm = LLM(model=request.getfixturevalue(ckpt_name), dtype="bfloat16", device="cpu")
    assert llm.engine.engine_core.executor.runner.model.cpu_decoder is None
