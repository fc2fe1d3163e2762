"""The real default model, SmolLM2-135M-Instruct from its GGUF file: facts, parity, tokenizer, the server.

The oracle for parity is transformers on the very same dequantized weights (the fp32 checkpoint
directory that `splitfuse convert` writes), and its own GGUF tokenizer for the tokenizer test.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from splitfuse import LLM, SamplingParams
from splitfuse.engine.resolved_config import cpu_auto_dtype, load_tokenizer
from server_process import serve_process

# Each question's greedy answer (dtype auto, the default: bf16 or fp32 by CPU) must contain the fact.
FACTS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is 2 + 2?", "4"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
]
PARITY_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
]


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def default_llm() -> LLM:
    return LLM()  # no model named: SmolLM2, dtype auto


def test_default_model_answers_facts(default_llm):
    outputs = default_llm.chat([_chat(q) for q, _ in FACTS], SamplingParams(max_tokens=48, temperature=0),
                               use_tqdm=False)
    answers = {q: o.outputs[0].text for (q, _), o in zip(FACTS, outputs)}
    assert {q: fact in answers[q] for q, fact in FACTS} == {q: True for q, _ in FACTS}, answers
    assert outputs[0].outputs[0].text == "The capital of France is Paris."
    assert outputs[0].outputs[0].finish_reason == "stop"  # <|im_end|> ends the answer


def test_default_model_is_smollm2_from_its_gguf_file(default_llm):
    arch = default_llm.engine.resolved.arch
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim,
            arch.vocab_size, arch.tie_word_embeddings, arch.rope_theta) == (30, 576, 9, 3, 64, 49152, True, 1e5)
    assert default_llm.engine.resolved.dtype == getattr(torch, cpu_auto_dtype())
    assert default_llm.engine.resolved.eos_token_ids == frozenset({2})  # <|im_end|>


def _transformers_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_fp32_greedy_equals_transformers_with_chunked_prefill_and_prefix_cache(smollm2_fp32_dir):
    llm = LLM(model=smollm2_fp32_dir, dtype="float32", max_num_batched_tokens=16)  # every prompt is chunked
    prompts = [llm.apply_chat_template(_chat(q)) for q in PARITY_QUESTIONS]
    assert min(len(p) for p in prompts) > 16
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    cold = llm.generate(prompts, params, use_tqdm=False)
    warm = llm.generate(prompts, params, use_tqdm=False)  # the same prompts again: prefix cache hits
    # The default system prompt fills the first 16-token block of every prompt: computed once, then shared.
    assert [o.num_cached_tokens for o in cold] == [0, 16, 16, 16, 16, 16]
    # Run again, every full block of each prompt comes from the cache.
    assert [o.num_cached_tokens for o in warm] == [len(p) // 16 * 16 for p in prompts]
    reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2_fp32_dir, dtype=torch.float32).eval()
    expected = [_transformers_greedy(reference, p, 48) for p in prompts]
    assert [list(o.outputs[0].token_ids) for o in cold] == expected
    assert [list(o.outputs[0].token_ids) for o in warm] == expected


def test_tokenizer_and_chat_template_equal_transformers_gguf_tokenizer(smollm2_gguf, smollm2_bf16_dir):
    theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf),
                                                        gguf_file=os.path.basename(smollm2_gguf))
    ours = load_tokenizer(smollm2_bf16_dir)
    texts = ["Hello world", "  leading spaces and\ttabs\n\nnewlines", "héllo wörld 你好 🙂 ∑",
             "def add(a, b):\n    return a + b\n", "<|im_start|>user\nhi<|im_end|>", "1234567890 3.14159"]
    assert [ours.encode(t) for t in texts] == [theirs.encode(t) for t in texts]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]
    for messages in (conversation, conversation[1:2]):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
        assert ours.encode(expected, add_special_tokens=False) == theirs.encode(expected, add_special_tokens=False)
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_openai_client_chats_with_splitfuse_serve_and_no_model_flag(smollm2_default_dir):  # converted here, once
    import openai

    with serve_process("--log-level", "warning", timeout_s=300) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
        reply = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=32,
                                               messages=_chat("What is the capital of France?"))
        assert reply.choices[0].message.content == "The capital of France is Paris."
        assert reply.choices[0].finish_reason == "stop"
