"""Builds small random Hugging Face checkpoints (tokenizer + safetensors) for tests and the demo, offline.

Nothing here touches a model hub: the tokenizer is trained locally on a corpus generated in code, and the
weights come from `AutoModelForCausalLM.from_config` under a fixed seed, so the same call writes the same
bytes every run.

What transformers 5.23 writes into config.json (our loader must read exactly this):

- RoPE lives in `rope_parameters`, a dict that always holds `rope_type` and `rope_theta`
  (e.g. `{"rope_theta": 10000.0, "rope_type": "default"}`). There is NO top-level `rope_theta` and no
  `rope_scaling` key any more; Llama-3 scaling is `{"rope_type": "llama3", "rope_theta": ..., "factor": 8.0,
  "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}` in the same dict.
  Older hub checkpoints still carry `rope_theta` + `rope_scaling` (with `type` or `rope_type`), so a loader
  should accept both spellings.
- The weight dtype is saved as `"dtype"` (v4 wrote `"torch_dtype"`).
- `head_dim` is always written (Llama/Mistral/Mixtral derive it as hidden // heads when not given).
- Mistral/Mixtral: `sliding_window` is an int or null. Qwen2/Qwen3: `use_sliding_window` (bool),
  `sliding_window` (already forced to null when use_sliding_window is false), `max_window_layers` and a
  per-layer `layer_types` list (`"full_attention"` / `"sliding_attention"`), which is the thing to trust.
- Tied embeddings (`tie_word_embeddings: true`): the safetensors hold no `lm_head.weight` at all.
- Mixtral's in-memory v5 modules fuse the experts, but `save_pretrained` reverts to the classic hub layout:
  `model.layers.N.block_sparse_moe.gate.weight` [experts, hidden] and
  `model.layers.N.block_sparse_moe.experts.E.{w1,w2,w3}.weight` (w1 = gate, w3 = up, w2 = down).
  `num_local_experts` / `num_experts_per_tok` name the counts.
- Qwen2 adds `self_attn.{q,k,v}_proj.bias`; Qwen3 adds `self_attn.q_norm.weight` / `self_attn.k_norm.weight`
  of shape [head_dim] (RMSNorm over each head, applied before RoPE).
"""

from __future__ import annotations

import collections
import copy
import json
import os
import random
import types

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from splitfuse.checkpoint_dirs import atomic_directory

# ids 0..4 in every tokenizer we train, in this order.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Fixed text so the tokenizer sees multi-byte UTF-8 (2-, 3- and 4-byte characters). Characters that stay
# rare end up split over several byte tokens, which is what incremental detokenization must survive.
_FIXED_LINES = [
    "héllo wörld 你好 🙂 ∑",
    "Grüße aus München: naïve café, façade, smörgåsbord, señor.",
    "Привет, мир! Как дела? Всё хорошо.",
    "こんにちは世界。日本語のテキストです。",
    "你好，世界！今天天气很好。我们去公园吧。",
    "Γειά σου κόσμε. ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ → ←",
    "emoji: 🙂 😀 🚀 ❤️ 👍🏽 🎉",
    "def add(a, b):\n    return a + b\n",
    '{"key": [1, 2, 3], "ok": true, "name": "splitfuse"}',
    "The quick brown fox jumps over the lazy dog. 0123456789",
]
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w",
           "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "ck", "ng", "st"]
_PUNCTUATION = [".", ".", ".", ",", "?", "!", ";", ":"]


def _make_lexicon(rng: random.Random, num_words: int) -> list[str]:
    """Distinct pseudo-words built from syllables, in a fixed order (list, never a set: set order
    depends on PYTHONHASHSEED and would make the corpus differ between runs)."""
    seen: dict[str, None] = {}
    while len(seen) < num_words:
        num_syllables = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(num_syllables))
        seen[word] = None
    return list(seen)


def make_corpus(vocab_size: int, seed: int = 0) -> list[str]:
    """Deterministic training lines: Zipf-distributed pseudo-word sentences plus fixed multilingual text.

    The corpus grows with vocab_size so that BPE finds enough merges to fill the vocabulary."""
    rng = random.Random(seed)
    lexicon = _make_lexicon(rng, num_words=max(1000, vocab_size))
    # Zipf: word of rank r has weight 1/(r+1), like natural text, so merges have a realistic frequency order.
    cum_weights, total = [], 0.0
    for rank in range(len(lexicon)):
        total += 1.0 / (rank + 1)
        cum_weights.append(total)
    num_sentences = max(2000, vocab_size // 4)
    lines = []
    for sentence_index in range(num_sentences):
        words = rng.choices(lexicon, cum_weights=cum_weights, k=rng.randint(4, 16))
        words[0] = words[0].capitalize()
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randrange(10_000)))
        lines.append(" ".join(words) + rng.choice(_PUNCTUATION))
        if sentence_index % 50 == 0:
            lines.append(_FIXED_LINES[(sentence_index // 50) % len(_FIXED_LINES)])
    return lines


def _top_characters(lines: list[str], limit: int) -> list[str]:
    """The `limit` most frequent characters (as the Metaspace pre-tokenizer sees them), ties broken by the
    character itself. We pick the alphabet ourselves because the trainer's own `limit_alphabet` cut breaks
    frequency ties in hash-map order, which changes from run to run."""
    counts = collections.Counter("".join(lines).replace(" ", "▁"))
    ranked = sorted(counts.items(), key=lambda item: (item[0] != "▁", -item[1], item[0]))  # "▁" always first
    return [character for character, _ in ranked[:limit]]


def _byte_token(byte: int) -> str:
    return f"<0x{byte:02X}>"


def _filler_token(index: int) -> str:
    # Plain vocab entries no merge can reach: they only exist to make the vocab size exact.
    return f"<|filler_{index}|>"


def _new_backend(byte_fallback: bool) -> Tokenizer:
    if byte_fallback:
        # Llama-2 / sentencepiece style: "▁" marks word starts, unknown characters become <0xXX> tokens.
        backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
        ])
    else:
        # GPT-2 / Llama-3 style byte-level BPE: every string is encodable, no <unk> ever produced.
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    return backend


def _renumber_vocab(backend: Tokenizer, vocab_size: int, byte_fallback: bool) -> Tokenizer:
    """Rebuilds the trained BPE vocab as specials, then <0x00>..<0xFF> (byte_fallback), then learned
    tokens, then fillers, so that the vocabulary has exactly vocab_size entries."""
    state = json.loads(backend.to_str())
    trained = sorted(state["model"]["vocab"].items(), key=lambda item: item[1])
    ordered = list(SPECIAL_TOKENS)
    if byte_fallback:
        ordered += [_byte_token(byte) for byte in range(256)]
    ordered += [token for token, _ in trained if token not in SPECIAL_TOKENS]
    if len(ordered) > vocab_size:
        raise ValueError(f"trained vocab has {len(ordered)} tokens, more than vocab_size={vocab_size}")
    ordered += [_filler_token(index) for index in range(vocab_size - len(ordered))]
    state["model"]["vocab"] = {token: token_id for token_id, token in enumerate(ordered)}
    for added in state["added_tokens"]:
        added["id"] = SPECIAL_TOKENS.index(added["content"])
    return Tokenizer.from_str(json.dumps(state))


def train_tokenizer(
    vocab_size: int, *, byte_fallback: bool = False, seed: int = 0
) -> transformers.PreTrainedTokenizerFast:
    """Trains a BPE tokenizer with exactly `vocab_size` tokens (specials included) on the generated corpus.

    Special ids: <unk>=0, <s>=1 (bos, prepended on encode), </s>=2 (eos), <|im_start|>=3, <|im_end|>=4.
    With byte_fallback, <0x00>..<0xFF> are ids 5..260. The chat template is ChatML."""
    # Byte-level needs its 256 base symbols; byte fallback needs 256 byte tokens plus at least "▁".
    min_vocab_size = len(SPECIAL_TOKENS) + 256 + (1 if byte_fallback else 0)
    if vocab_size < min_vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is below the minimum {min_vocab_size} for this tokenizer")
    backend = _new_backend(byte_fallback)
    corpus = make_corpus(vocab_size, seed)
    if byte_fallback:
        # The 256 byte tokens are added after training, so the trainer gets the remaining budget; the
        # alphabet cap keeps base characters from eating all of it, and rarer characters fall back to bytes.
        trainer_vocab_size = vocab_size - 256
        alphabet = _top_characters(corpus, limit=max(1, trainer_vocab_size // 2 - len(SPECIAL_TOKENS)))
        trainer = trainers.BpeTrainer(
            vocab_size=trainer_vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
            initial_alphabet=alphabet, limit_alphabet=len(alphabet),
        )
    else:
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    backend.train_from_iterator(corpus, trainer=trainer)
    backend = _renumber_vocab(backend, vocab_size, byte_fallback)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        add_bos_token=True, add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"built a tokenizer of {len(tokenizer)} tokens, wanted {vocab_size}")
    return tokenizer


def _reinit_weights(model: torch.nn.Module, init_std: float) -> None:
    """Redraws every weight so that a tiny random model has peaked logits and non-trivial side weights.

    HF's own init leaves biases at 0 and norm weights at 1, so a loader that drops them would still match
    the reference; here biases ~ N(0, init_std) and norm weights ~ 1 + N(0, 0.1), and matrices
    ~ N(0, init_std). A larger std than HF's 0.02 widens the gaps between the top logits, so greedy parity
    tests flip on float rounding less often (near-ties still happen: compare logits, not only tokens)."""
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied lm_head shares its tensor, so is drawn once
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, init_std)


def _build_model(hf_config, tokenizer, seed: int, dtype: torch.dtype, init_std: float | None):
    config = copy.deepcopy(hf_config)  # never mutate the caller's config
    if config.vocab_size != len(tokenizer):
        raise ValueError(f"config vocab_size={config.vocab_size} but tokenizer has {len(tokenizer)} tokens")
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    # fork_rng: seeding must not leak into the caller's random stream (tests sample after building).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if init_std is not None:
            _reinit_weights(model, init_std)
    # Draw in fp32, then cast: the bf16 demo is then exactly the rounded fp32 model of the same seed.
    model = model.to(dtype)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return model


def write_checkpoint(
    hf_config: transformers.PretrainedConfig,
    path: str | os.PathLike,
    *,
    tokenizer: transformers.PreTrainedTokenizerFast,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str | None = None,
    init_std: float | None = None,
) -> str:
    """Writes a random-weight HF checkpoint (config.json, safetensors, tokenizer, generation_config.json).

    `path` must not exist or be an empty directory. Everything is written into a temp dir next to it and
    renamed into place, so readers see either no checkpoint or a whole one. If another process finishes
    the same path first, raises FileExistsError (the other checkpoint is kept). `max_shard_size` (e.g.
    "200KB") splits weights into model-0000i-of-0000n.safetensors + model.safetensors.index.json.
    Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    with atomic_directory(path) as temp_dir:
        model = _build_model(hf_config, tokenizer, seed, dtype, init_std)
        model.save_pretrained(temp_dir, max_shard_size=max_shard_size or "50GB")
        tokenizer.save_pretrained(temp_dir)
    return path


# Weight std for the test checkpoints: logits std ~1.6 at hidden 64, which keeps greedy output varied and
# top-2 near-ties rare (measured: ~1 position in 100 has a top-2 gap under 1e-3), and attention not saturated.
TINY_INIT_STD = 0.2

# Shared tiny dimensions: big enough for GQA (4 query heads / 2 KV heads) and several KV blocks,
# small enough that a forward pass is instant on CPU.
TINY_VOCAB_SIZE = 512
_TINY_DIMS = dict(
    vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
)


def tiny_llama_config(**overrides) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{**_TINY_DIMS, **overrides})


def tiny_llama_mha_config(**overrides) -> transformers.LlamaConfig:
    return tiny_llama_config(**{"num_key_value_heads": 4, **overrides})


def tiny_llama_tied_config(**overrides) -> transformers.LlamaConfig:
    return tiny_llama_config(**{"tie_word_embeddings": True, **overrides})


def tiny_llama3_rope_config(**overrides) -> transformers.LlamaConfig:
    # v5 spelling: rope_parameters (rope_theta inside). The legacy `rope_scaling=` kwarg is still accepted
    # but is saved as rope_parameters anyway.
    rope_parameters = {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }
    return tiny_llama_config(**{"rope_parameters": rope_parameters, **overrides})


def tiny_mistral_config(**overrides) -> transformers.MistralConfig:
    # HF semantics: query i sees keys j with i - sliding_window < j <= i (the window includes itself).
    return transformers.MistralConfig(**{**_TINY_DIMS, "sliding_window": 8, **overrides})


def tiny_qwen2_config(**overrides) -> transformers.Qwen2Config:
    # Qwen2 always has q/k/v biases (no config key). With use_sliding_window=False, v5 saves
    # sliding_window=null and layer_types all "full_attention".
    return transformers.Qwen2Config(**{**_TINY_DIMS, "use_sliding_window": False, **overrides})


def tiny_qwen3_config(**overrides) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(**{**_TINY_DIMS, "use_sliding_window": False, **overrides})


def tiny_mixtral_config(**overrides) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        **{**_TINY_DIMS, "num_local_experts": 4, "num_experts_per_tok": 2, **overrides}
    )


# Family id -> config factory; the ids name the parametrized parity tests.
TINY_CONFIG_FACTORIES = types.MappingProxyType({
    "llama": tiny_llama_config,
    "llama_mha": tiny_llama_mha_config,
    "llama_tied": tiny_llama_tied_config,
    "llama3_rope": tiny_llama3_rope_config,
    "mistral": tiny_mistral_config,
    "qwen2": tiny_qwen2_config,
    "qwen3": tiny_qwen3_config,
    "mixtral": tiny_mixtral_config,
})
