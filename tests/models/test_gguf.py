"""GGUF checkpoints: every tensor type, llama.cpp's q/k permutation, tied embeddings, errors, the cache.

The oracle is transformers' own GGUF loader reading the same file: it dequantizes with the gguf
package and undoes the permutation independently of splitfuse. The files are written by
splitfuse.gguf_factory with SmolLM2's tokenizer metadata (so vocab 49,152) and tiny layers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from splitfuse import LLM, SamplingParams
from splitfuse.gguf_factory import write_gguf
from splitfuse.models.gguf import GGUFError, convert_gguf
from splitfuse.models.sources import converted_gguf_dir, resolve_model

pytest.importorskip("accelerate")  # transformers needs it to load GGUF files

VOCAB_SIZE = 49152
_DIMS = dict(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2)
# Every type we claim, on a different weight of one file (K-quant blocks are 256 wide: all inputs are).
MIXED_TYPES = {
    "model.embed_tokens.weight": "Q8_0",
    "model.layers.0.self_attn.q_proj.weight": "Q4_0",
    "model.layers.0.self_attn.k_proj.weight": "Q4_1",
    "model.layers.0.self_attn.v_proj.weight": "Q5_0",
    "model.layers.0.self_attn.o_proj.weight": "Q5_1",
    "model.layers.0.mlp.gate_proj.weight": "Q4_K",
    "model.layers.0.mlp.up_proj.weight": "Q6_K",
    "model.layers.0.mlp.down_proj.weight": "Q2_K",
    "model.layers.1.self_attn.q_proj.weight": "Q3_K",
    "model.layers.1.self_attn.k_proj.weight": "Q5_K",
    "model.layers.1.self_attn.v_proj.weight": "F16",
    "model.layers.1.self_attn.o_proj.weight": "BF16",
    "model.layers.1.mlp.gate_proj.weight": "Q8_0",
    "model.layers.1.mlp.up_proj.weight": "F32",
    "model.layers.1.mlp.down_proj.weight": "Q4_K",
    "lm_head.weight": "Q6_K",
}
PROMPTS = [[1, 9690, 198, 2683, 359, 253, 5356], [504, 3458, 282, 4649, 314], list(range(100, 140))]


def _random_model(config: transformers.PretrainedConfig) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.normal_(1.0, 0.1) if name.endswith("norm.weight") else param.normal_(0.0, 0.08)
    return model


@pytest.fixture(scope="module")
def mixed_llama_gguf(tmp_path_factory, smollm2_gguf) -> str:
    model = _random_model(transformers.LlamaConfig(**_DIMS))
    path = str(tmp_path_factory.mktemp("gguf") / "mixed-llama.gguf")
    return write_gguf(path, model, "llama", smollm2_gguf, MIXED_TYPES)


@pytest.fixture(scope="module")
def tied_qwen2_gguf(tmp_path_factory, smollm2_gguf) -> str:
    model = _random_model(transformers.Qwen2Config(**_DIMS, tie_word_embeddings=True, use_sliding_window=False))
    path = str(tmp_path_factory.mktemp("gguf") / "tied-qwen2.gguf")
    return write_gguf(path, model, "qwen2", smollm2_gguf, lambda name: "Q8_0" if "embed" in name else "Q4_K")


def _transformers_from_gguf(path: str) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def _transformers_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _converted_weights(directory: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "model.safetensors"))


@pytest.mark.parametrize("fixture", ["mixed_llama_gguf", "tied_qwen2_gguf"])
def test_dequantized_weights_equal_transformers_gguf_loader(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    ours = _converted_weights(convert_gguf(path, str(tmp_path / "hf"), torch.float32))
    theirs = {k: v for k, v in _transformers_from_gguf(path).state_dict().items()}
    if "lm_head.weight" not in ours:  # tied: transformers shows the embedding under both names
        assert fixture == "tied_qwen2_gguf"
        theirs.pop("lm_head.weight")
    assert sorted(ours) == sorted(theirs)
    mismatched = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert mismatched == []


def test_q_and_k_rows_are_unpermuted_back_to_the_hf_layout(mixed_llama_gguf, tmp_path):
    # F16 keeps values close enough to compare with the original weights row by row: a wrong permutation
    # would move whole rows, far beyond fp16 rounding.
    model = _random_model(transformers.LlamaConfig(**_DIMS))
    path = write_gguf(str(tmp_path / "f16.gguf"), model, "llama", mixed_llama_gguf, lambda name: "F16")
    ours = _converted_weights(convert_gguf(path, str(tmp_path / "hf"), torch.float32))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        expected = model.state_dict()[name].to(torch.float16).to(torch.float32)
        assert torch.equal(ours[name], expected), name


@pytest.mark.parametrize("fixture", ["mixed_llama_gguf", "tied_qwen2_gguf"])
def test_engine_greedy_tokens_equal_transformers_on_the_gguf_file(fixture, request):
    path = request.getfixturevalue(fixture)
    reference = _transformers_from_gguf(path)
    llm = LLM(model=path, dtype="float32", max_num_batched_tokens=16)  # prompts split into chunks
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == [_transformers_greedy(reference, p, 12)
                                                              for p in PROMPTS]


def test_config_from_gguf_metadata(mixed_llama_gguf, tied_qwen2_gguf):
    llama = LLM(model=mixed_llama_gguf, dtype="float32").engine.resolved.arch
    assert (llama.architecture, llama.num_layers, llama.hidden_size, llama.num_heads, llama.num_kv_heads,
            llama.head_dim, llama.intermediate_size, llama.vocab_size, llama.tie_word_embeddings,
            llama.qkv_bias) == ("LlamaForCausalLM", 2, 256, 4, 2, 64, 512, VOCAB_SIZE, False, False)
    qwen2 = LLM(model=tied_qwen2_gguf, dtype="float32").engine.resolved.arch
    assert (qwen2.architecture, qwen2.tie_word_embeddings, qwen2.qkv_bias) == ("Qwen2ForCausalLM", True, True)


def test_unsupported_tensor_type_is_named(tmp_path, smollm2_gguf):
    model = _random_model(transformers.LlamaConfig(**_DIMS))
    path = write_gguf(str(tmp_path / "tq.gguf"), model, "llama", smollm2_gguf,
                      lambda name: "TQ1_0" if name == "model.layers.1.mlp.up_proj.weight" else "Q8_0")
    with pytest.raises(GGUFError, match="tensor 'blk.1.ffn_up.weight' has GGUF type TQ1_0, which is not "
                                        "supported; supported: BF16, F16, F32, Q2_K"):
        convert_gguf(path, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")  # nothing half-written is left behind
    assert [n for n in os.listdir(tmp_path) if n.startswith(".hf")] == []


def test_unsupported_architecture_is_named(tmp_path, smollm2_gguf):
    model = _random_model(transformers.LlamaConfig(**_DIMS))
    path = write_gguf(str(tmp_path / "gpt2.gguf"), model, "gpt2", smollm2_gguf)
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'gpt2'; supported: llama, qwen2, qwen3"):
        LLM(model=path)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFError, match="is a file but not a GGUF file"):
        LLM(model=str(path))
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory, a .gguf file, nor a built-in"):
        LLM(model=str(tmp_path / "missing"))


def test_conversion_is_cached_by_path_size_and_mtime(mixed_llama_gguf, tmp_path):
    cache = str(tmp_path / "cache")
    first = converted_gguf_dir(mixed_llama_gguf, "float32", cache_root=cache)
    weights = os.path.join(first, "model.safetensors")
    written_ns = os.stat(weights).st_mtime_ns
    assert converted_gguf_dir(mixed_llama_gguf, "float32", cache_root=cache) == first
    assert os.stat(weights).st_mtime_ns == written_ns  # not converted again
    bf16 = converted_gguf_dir(mixed_llama_gguf, "bfloat16", cache_root=cache)
    assert bf16 != first and bf16.endswith("-bfloat16")
    assert _converted_weights(bf16)["model.norm.weight"].dtype == torch.bfloat16
    stat = os.stat(mixed_llama_gguf)
    os.utime(mixed_llama_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # "edited": a new copy
    assert converted_gguf_dir(mixed_llama_gguf, "float32", cache_root=cache) not in (first, bf16)


def test_convert_command_writes_a_checkpoint_transformers_loads(mixed_llama_gguf, tmp_path):
    out = tmp_path / "converted"
    done = subprocess.run([sys.executable, "-m", "splitfuse", "convert", mixed_llama_gguf, str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    reference = _transformers_from_gguf(mixed_llama_gguf)
    assert _transformers_greedy(model, PROMPTS[0], 10) == _transformers_greedy(reference, PROMPTS[0], 10)
    again = subprocess.run([sys.executable, "-m", "splitfuse", "convert", mixed_llama_gguf, str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already exists and is not empty" in again.stderr


def test_resolve_model_names():
    assert resolve_model("demo-random").served_name == "demo-random"
    resolved = resolve_model("")
    assert resolved.served_name == "smollm2-135m-instruct"
    assert resolved.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolved.path.endswith("-bfloat16") and os.path.isfile(os.path.join(resolved.path, "config.json"))
