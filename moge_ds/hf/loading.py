"""Building a Hugging Face MoE causal LM from a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moge_ds.hf.families import read_config

if TYPE_CHECKING:
    from moge_ds.config import ModelConfig

# What from_pretrained reads weights from; one of them must be in a "pretrained" model directory.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def has_weights(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def build(model: ModelConfig, seed: int) -> torch.nn.Module:
    """The causal LM of ``model.hf_path``: its weights (``hf_init`` "pretrained", fp32) or fresh ones."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if model.hf_init == "random":
        return AutoModelForCausalLM.from_config(read_config(model.hf_path), dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model.hf_path, local_files_only=True, dtype=torch.float32)
