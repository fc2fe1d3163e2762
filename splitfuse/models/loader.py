"""Builds a model from a Hugging Face checkpoint directory (safetensors, sharded or not)."""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterator

import torch
from safetensors import safe_open

from splitfuse.models.config import ArchConfig
from splitfuse.models.llama import LlamaForCausalLM
from splitfuse.models.mixtral import MixtralForCausalLM
from splitfuse.platforms import Platform

MODEL_CLASSES = {"llama": LlamaForCausalLM, "mixtral": MixtralForCausalLM}

# layers.0.mlp.experts.3.w1.weight -> (layer prefix "layers.0.mlp.", expert 3, which 1)
_EXPERT = re.compile(r"^(.*\.mlp\.)experts\.(\d+)\.w([123])\.weight$")


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's weight files: from the shard index when there is one."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise FileNotFoundError(f"shards listed in {index_path} are missing: {', '.join(missing)}")
        return [os.path.join(path, n) for n in names]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}; only safetensors checkpoints are supported")
    return files


def iterate_checkpoint(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(path: str, config: ArchConfig, platform: Platform) -> torch.nn.Module:
    """The model in the platform's dtype on its device, built with the platform's choices (ops, backend, packing)."""
    model_class = MODEL_CLASSES[config.family]
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(platform.dtype)
    try:
        with torch.device(platform.device):
            model = model_class(config, platform)
    finally:
        torch.set_default_dtype(previous_dtype)
    _WeightLoader(model).load(iterate_checkpoint(path))
    model.prepare_for_inference()
    return model.eval()


class _WeightLoader:
    """Copies checkpoint tensors into (possibly fused) parameters and checks nothing is left unset."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.loaded_elements = {name: 0 for name in self.params}

    def load(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for checkpoint_name, tensor in tensors:
                name = self.model.checkpoint_name(checkpoint_name)
                if name is None or (name == "lm_head.weight" and self.model.lm_head is None):
                    continue
                self._load_one(name, checkpoint_name, tensor)
        missing = [n for n, count in self.loaded_elements.items() if count < self.params[n].numel()]
        if missing:
            raise ValueError(f"checkpoint is missing weights for: {', '.join(missing[:8])}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

    def _load_one(self, name: str, checkpoint_name: str, tensor: torch.Tensor) -> None:
        expert = _EXPERT.match(name)
        if expert:
            prefix, index, which = expert.group(1), int(expert.group(2)), expert.group(3)
            param_name = prefix + ("w2" if which == "2" else "w13")
            rows = self.params[param_name].shape[1] // (1 if which == "2" else 2)
            offset = rows if which == "3" else 0
            self._copy(param_name, checkpoint_name, tensor, lambda p: p[index, offset:offset + rows])
            return
        for fragment, (fused_fragment, shard) in self.model.fused_weights.items():
            if fragment in name:
                param_name = name.replace(fragment, fused_fragment)
                sizes = self.model.shard_sizes(param_name)
                offset = sum(sizes[:shard])
                self._copy(param_name, checkpoint_name, tensor, lambda p: p[offset:offset + sizes[shard]])
                return
        self._copy(name, checkpoint_name, tensor, lambda p: p)

    def _copy(self, param_name: str, checkpoint_name: str, tensor: torch.Tensor, view) -> None:
        if param_name not in self.params:
            raise ValueError(f"checkpoint tensor {checkpoint_name!r} matches no parameter of "
                             f"{type(self.model).__name__}")
        target = view(self.params[param_name].data)
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor {checkpoint_name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(target.shape)}")
        target.copy_(tensor)
        self.loaded_elements[param_name] += tensor.numel()
