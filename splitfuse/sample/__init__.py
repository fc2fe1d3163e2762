"""Batched sampling: one step's logits in, one token (and its logprobs) per sequence out."""

from splitfuse.sample.sampler import Sampler, SamplerOutput, SamplingRow

__all__ = ["Sampler", "SamplerOutput", "SamplingRow"]
