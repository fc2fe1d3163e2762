"""Specifies the demo checkpoint, the trained tokenizers and the tiny test checkpoints they are built from."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open

import splitfuse
import splitfuse.demo
from splitfuse import checkpoint_factory
from splitfuse.demo import DEMO_CHECKPOINT_NAME, demo_model_path

MULTILINGUAL_TEXTS = [
    "héllo wörld 你好 🙂 ∑",
    "Grüße, naïve café! Привет мир. こんにちは",
    "rare: 龘 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👍🏽 e\u0301",
    "  leading spaces, tabs\tand\nnew lines\n\n",
]


def _read_json(checkpoint: str, file_name: str) -> dict:
    with open(os.path.join(checkpoint, file_name), encoding="utf-8") as file:
        return json.load(file)


def _tensors(checkpoint: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, sharded or not."""
    index_path = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.exists(index_path):
        file_names = sorted(set(_read_json(checkpoint, "model.safetensors.index.json")["weight_map"].values()))
    else:
        file_names = ["model.safetensors"]
    tensors = {}
    for file_name in file_names:
        with safe_open(os.path.join(checkpoint, file_name), framework="pt") as file:
            tensors.update({name: file.get_tensor(name) for name in file.keys()})
    return tensors


@pytest.fixture(scope="module")
def demo_tokenizer(demo_ckpt) -> transformers.PreTrainedTokenizerFast:
    return transformers.AutoTokenizer.from_pretrained(demo_ckpt)


# --- demo checkpoint ------------------------------------------------------------------------------


def test_demo_config_has_the_documented_shape(demo_ckpt):
    config = _read_json(demo_ckpt, "config.json")
    assert os.path.basename(demo_ckpt) == DEMO_CHECKPOINT_NAME
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert {key: config[key] for key in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings", "dtype",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "rope_parameters",
    )} == {
        "model_type": "llama", "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 32000,
        "max_position_embeddings": 2048, "dtype": "bfloat16", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    }
    assert _read_json(demo_ckpt, "generation_config.json")["eos_token_id"] == 2


def test_demo_weights_are_one_bf16_safetensors_file(demo_ckpt):
    assert not os.path.exists(os.path.join(demo_ckpt, "model.safetensors.index.json"))
    tensors = _tensors(demo_ckpt)
    assert len(tensors) == 2 + 1 + 8 * 9  # embed, lm_head, final norm; 9 per layer
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    assert tensors["model.embed_tokens.weight"].shape == (32000, 512)
    assert tensors["lm_head.weight"].shape == (32000, 512)
    assert tensors["model.layers.7.self_attn.q_proj.weight"].shape == (512, 512)
    assert tensors["model.layers.7.self_attn.k_proj.weight"].shape == (256, 512)  # 4 KV heads x 64
    assert tensors["model.layers.7.mlp.gate_proj.weight"].shape == (1536, 512)
    assert tensors["model.layers.7.mlp.down_proj.weight"].shape == (512, 1536)


def test_demo_tokenizer_has_exactly_32000_tokens_and_fixed_special_ids(demo_tokenizer):
    assert len(demo_tokenizer) == 32000
    assert demo_tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == checkpoint_factory.SPECIAL_TOKENS
    assert (demo_tokenizer.unk_token_id, demo_tokenizer.bos_token_id, demo_tokenizer.eos_token_id) == (0, 1, 2)


def test_demo_path_is_reused_without_rewriting(demo_ckpt):
    weights = os.path.join(demo_ckpt, "model.safetensors")
    mtime_before = os.stat(weights).st_mtime_ns
    assert demo_model_path(os.path.dirname(demo_ckpt)) == demo_ckpt
    assert os.stat(weights).st_mtime_ns == mtime_before
    # The atomic write leaves no temp folders next to the checkpoint.
    assert os.listdir(os.path.dirname(demo_ckpt)) == [DEMO_CHECKPOINT_NAME]


@pytest.mark.slow  # a second full demo generation, ~5 s
def test_demo_generation_is_byte_identical(demo_ckpt, tmp_path):
    second = demo_model_path(str(tmp_path))
    assert sorted(os.listdir(second)) == sorted(os.listdir(demo_ckpt))
    for file_name in os.listdir(demo_ckpt):
        with open(os.path.join(demo_ckpt, file_name), "rb") as first_file:
            with open(os.path.join(second, file_name), "rb") as second_file:
                assert first_file.read() == second_file.read(), file_name


def test_demo_path_returns_the_checkpoint_a_concurrent_writer_finished_first(monkeypatch, tmp_path):
    def lose_the_race(hf_config, path, **kwargs):
        os.makedirs(path)
        with open(os.path.join(path, "config.json"), "w") as file:
            file.write("{}")
        raise FileExistsError(path)

    monkeypatch.setattr(splitfuse.demo, "train_tokenizer", lambda vocab_size, seed: None)
    monkeypatch.setattr(splitfuse.demo, "write_checkpoint", lose_the_race)
    assert demo_model_path(str(tmp_path)) == str(tmp_path / DEMO_CHECKPOINT_NAME)


def test_write_checkpoint_that_loses_the_race_keeps_the_winner(monkeypatch, tmp_path, tiny_tokenizer):
    real_build_model = checkpoint_factory._build_model

    def build_while_another_process_finishes(*args):
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "config.json").write_text("winner")
        return real_build_model(*args)

    monkeypatch.setattr(checkpoint_factory, "_build_model", build_while_another_process_finishes)
    with pytest.raises(FileExistsError):
        checkpoint_factory.write_checkpoint(
            checkpoint_factory.tiny_llama_config(), tmp_path / "ckpt", tokenizer=tiny_tokenizer)
    assert os.listdir(tmp_path) == ["ckpt"]  # our temp folder is gone
    assert (tmp_path / "ckpt" / "config.json").read_text() == "winner"


def test_demo_cache_root_comes_from_env(monkeypatch, demo_ckpt):
    monkeypatch.setenv("SPLITFUSE_CACHE", os.path.dirname(demo_ckpt))
    assert demo_model_path() == demo_ckpt


# --- tokenizers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", MULTILINGUAL_TEXTS)
def test_demo_tokenizer_round_trips_multibyte_text(demo_tokenizer, text):
    token_ids = demo_tokenizer(text)["input_ids"]
    assert token_ids[0] == demo_tokenizer.bos_token_id  # prepended by tokenizer.json's post-processor
    assert demo_tokenizer.decode(token_ids, skip_special_tokens=True) == text


def test_rare_character_is_split_across_byte_level_tokens(demo_tokenizer):
    # 龘 (E9 BE 98) never occurs in the corpus: three tokens, none of which is valid UTF-8 alone.
    token_ids = demo_tokenizer.encode("龘", add_special_tokens=False)
    assert demo_tokenizer.convert_ids_to_tokens(token_ids) == ["é", "¾", "ĺ"]  # byte-level spelling of E9 BE 98
    assert [demo_tokenizer.decode([token_id]) for token_id in token_ids] == ["\ufffd"] * 3
    assert demo_tokenizer.decode(token_ids) == "龘"


def test_character_is_split_between_tokens_that_also_hold_ascii(demo_tokenizer):
    # ï is C3 AF; "aÃ" ends with its first byte and "¯ve" starts with its second.
    token_ids = demo_tokenizer.encode("naïve", add_special_tokens=False)
    assert demo_tokenizer.convert_ids_to_tokens(token_ids) == ["n", "aÃ", "¯ve"]
    assert [demo_tokenizer.decode([token_id]) for token_id in token_ids] == ["n", "a\ufffd", "\ufffdve"]
    assert demo_tokenizer.decode(token_ids) == "naïve"


@pytest.mark.parametrize("tokenizer_fixture", ["tiny_tokenizer", "byte_fallback_tokenizer"])
def test_tiny_tokenizer_round_trips_multibyte_text(request, tokenizer_fixture):
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    assert len(tokenizer) == 512
    for text in MULTILINGUAL_TEXTS:
        if tokenizer_fixture == "byte_fallback_tokenizer" and text.startswith(" "):
            continue  # see test_byte_fallback_tokenizer_drops_one_leading_space
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_byte_fallback_tokenizer_drops_one_leading_space(byte_fallback_tokenizer):
    # Same as HF's Llama-2 fast tokenizer: Metaspace adds the "▁" prefix only when the text does not already
    # start with a space, while the decoder always strips one leading space. A detokenizer must match
    # tokenizer.decode, not the original prompt.
    token_ids = byte_fallback_tokenizer.encode("  two", add_special_tokens=False)
    assert byte_fallback_tokenizer.decode(token_ids) == " two"
    assert byte_fallback_tokenizer.decode(byte_fallback_tokenizer.encode("one  two")) == "<s> one  two"


@pytest.mark.slow  # one fresh interpreter, ~5 s
def test_tokenizer_training_does_not_depend_on_the_hash_seed():
    # Set iteration order (Python) and HashMap order (the Rust trainer) change with the process; a fresh
    # process with another PYTHONHASHSEED must train the very same tokenizer.
    script = (
        "import hashlib; from splitfuse.checkpoint_factory import train_tokenizer\n"
        "for byte_fallback in (False, True):\n"
        "    state = train_tokenizer(512, byte_fallback=byte_fallback).backend_tokenizer.to_str()\n"
        "    print(hashlib.sha256(state.encode()).hexdigest())\n"
    )
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(splitfuse.__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": repo_root}
    result = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True)
    expected = [
        hashlib.sha256(checkpoint_factory.train_tokenizer(512, byte_fallback=byte_fallback)
                       .backend_tokenizer.to_str().encode()).hexdigest()
        for byte_fallback in (False, True)
    ]
    assert result.stdout.split() == expected


def test_chat_template_is_chatml(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo"}]
    assert tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny_tokenizer.apply_chat_template(messages[1:], tokenize=False) == (
        "<|im_start|>user\nhéllo<|im_end|>\n"
    )


def test_chat_markers_are_single_special_tokens(tiny_tokenizer):
    token_ids = tiny_tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert token_ids[0] == 3 and token_ids[-1] == 4
    assert tiny_tokenizer.decode(token_ids, skip_special_tokens=True) == "user\nhi"


def test_training_is_deterministic():
    first = checkpoint_factory.train_tokenizer(512, byte_fallback=True)
    second = checkpoint_factory.train_tokenizer(512, byte_fallback=True)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert first.backend_tokenizer.to_str() != checkpoint_factory.train_tokenizer(
        512, byte_fallback=True, seed=1).backend_tokenizer.to_str()


def test_short_training_is_padded_with_fillers_to_the_exact_size(monkeypatch):
    monkeypatch.setattr(checkpoint_factory, "make_corpus", lambda vocab_size, seed: ["ab ab abc"] * 10)
    tokenizer = checkpoint_factory.train_tokenizer(300)
    assert len(tokenizer) == 300
    first_filler_id = tokenizer.convert_tokens_to_ids("<|filler_0|>")
    assert 261 < first_filler_id < 300  # after 5 specials, 256 byte symbols and a few merges
    assert tokenizer.convert_ids_to_tokens(list(range(first_filler_id, 300))) == [
        f"<|filler_{index}|>" for index in range(300 - first_filler_id)
    ]
    assert max(tokenizer.encode("ab abc <|filler_0|>")) < first_filler_id  # fillers are unreachable


def test_byte_fallback_tokenizer_has_llama2_byte_tokens(byte_fallback_tokenizer):
    vocab = byte_fallback_tokenizer.get_vocab()
    assert [vocab[f"<0x{byte:02X}>"] for byte in (0x00, 0xE4, 0xFF)] == [5, 5 + 0xE4, 5 + 0xFF]
    token_ids = byte_fallback_tokenizer.encode("龘", add_special_tokens=False)
    assert byte_fallback_tokenizer.convert_ids_to_tokens(token_ids) == ["▁", "<0xE9>", "<0xBE>", "<0x98>"]
    assert byte_fallback_tokenizer.decode(token_ids) == "龘"


# --- tiny checkpoints -------------------------------------------------------------------------------


def test_sharded_checkpoint_has_an_index_and_the_same_tensors(llama_sharded_ckpt, llama_ckpt):
    weight_map = _read_json(llama_sharded_ckpt, "model.safetensors.index.json")["weight_map"]
    shard_names = sorted(set(weight_map.values()))
    assert len(shard_names) >= 2
    assert shard_names[0] == f"model-00001-of-{len(shard_names):05d}.safetensors"
    assert not os.path.exists(os.path.join(llama_sharded_ckpt, "model.safetensors"))
    sharded, whole = _tensors(llama_sharded_ckpt), _tensors(llama_ckpt)
    assert sorted(sharded) == sorted(weight_map) == sorted(whole)
    assert all(torch.equal(sharded[name], whole[name]) for name in whole)


def test_family_configs_use_transformers_5_keys(
    llama3_rope_ckpt, mistral_ckpt, qwen2_ckpt, mixtral_ckpt, llama_tied_ckpt,
):
    assert _read_json(llama3_rope_ckpt, "config.json")["rope_parameters"] == {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }
    assert "rope_scaling" not in _read_json(llama3_rope_ckpt, "config.json")
    assert _read_json(mistral_ckpt, "config.json")["sliding_window"] == 8
    qwen2 = _read_json(qwen2_ckpt, "config.json")
    assert (qwen2["use_sliding_window"], qwen2["sliding_window"]) == (False, None)
    assert qwen2["layer_types"] == ["full_attention", "full_attention"]
    mixtral = _read_json(mixtral_ckpt, "config.json")
    assert (mixtral["num_local_experts"], mixtral["num_experts_per_tok"]) == (4, 2)
    assert _read_json(llama_tied_ckpt, "config.json")["tie_word_embeddings"] is True


def test_family_tensor_names(llama_tied_ckpt, qwen2_ckpt, qwen3_ckpt, mixtral_ckpt):
    assert "lm_head.weight" not in _tensors(llama_tied_ckpt)
    qwen2 = _tensors(qwen2_ckpt)
    assert qwen2["model.layers.0.self_attn.q_proj.bias"].shape == (64,)
    assert qwen2["model.layers.0.self_attn.k_proj.bias"].shape == (32,)
    qwen3 = _tensors(qwen3_ckpt)
    assert qwen3["model.layers.0.self_attn.q_norm.weight"].shape == (16,)  # per head_dim
    assert qwen3["model.layers.0.self_attn.k_norm.weight"].shape == (16,)
    mixtral = _tensors(mixtral_ckpt)
    assert mixtral["model.layers.1.block_sparse_moe.gate.weight"].shape == (4, 64)
    assert mixtral["model.layers.1.block_sparse_moe.experts.3.w1.weight"].shape == (128, 64)  # gate
    assert mixtral["model.layers.1.block_sparse_moe.experts.3.w2.weight"].shape == (64, 128)  # down
    assert mixtral["model.layers.1.block_sparse_moe.experts.3.w3.weight"].shape == (128, 64)  # up


def test_init_std_randomizes_biases_and_norms(qwen2_ckpt, qwen3_ckpt):
    # HF's default init would leave these at 0 / 1, hiding a loader that drops them.
    assert _tensors(qwen2_ckpt)["model.layers.0.self_attn.q_proj.bias"].abs().min() > 0
    assert not torch.all(_tensors(qwen3_ckpt)["model.layers.0.self_attn.q_norm.weight"] == 1)


def test_write_checkpoint_refuses_a_non_empty_path(tmp_path, tiny_tokenizer):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        checkpoint_factory.write_checkpoint(
            checkpoint_factory.tiny_llama_config(), tmp_path / "ckpt", tokenizer=tiny_tokenizer)
    assert os.listdir(tmp_path / "ckpt") == ["keep.txt"]


def test_write_checkpoint_takes_special_ids_from_the_tokenizer(tmp_path, tiny_tokenizer):
    config = checkpoint_factory.tiny_qwen2_config()  # Qwen2 defaults to bos/eos = None
    path = checkpoint_factory.write_checkpoint(config, tmp_path / "ckpt", tokenizer=tiny_tokenizer)
    assert path == str(tmp_path / "ckpt")
    assert (config.bos_token_id, config.eos_token_id) == (None, None)  # the caller's config is untouched
    saved = _read_json(path, "config.json")
    assert (saved["bos_token_id"], saved["eos_token_id"]) == (1, 2)
    assert _read_json(path, "generation_config.json")["eos_token_id"] == 2
    assert os.listdir(tmp_path) == ["ckpt"]  # no temp folder left behind


@pytest.mark.parametrize("extra_fixture", ["llama_sharded_ckpt", "byte_fallback_ckpt"])
def test_extra_checkpoints_load_in_transformers(request, extra_fixture):
    _assert_loads_and_runs(request.getfixturevalue(extra_fixture))


def test_family_checkpoint_loads_in_transformers(family_ckpt):
    _assert_loads_and_runs(family_ckpt)


def _assert_loads_and_runs(checkpoint: str) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    assert {param.dtype for param in model.parameters()} == {torch.float32}
    input_ids = tokenizer("héllo wörld, the quick brown fox 你好", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], 512)
    assert torch.isfinite(logits).all()
