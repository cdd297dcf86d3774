"""MoGE for Hugging Face MoE models (Mixtral, Qwen2/3-MoE) under DeepSpeed AutoEP.

AutoEP (``"expert_parallel"`` in the ds_config) replaces each MoE block of the model with its
grouped-GEMM, all-to-all layer during ``deepspeed.initialize``. The model, plain or replaced,
returns one ``[T, E]`` router-logit tensor per MoE layer when called with
``output_router_logits=True``. The router is replicated on every rank, so these are the logits over
all E experts: MoGE's term needs no communication and no change to DeepSpeed.

The term has the native gate's form (``moge_ds.gate``): each layer contributes
``gs_weight * group_sparsity_loss(softmax(logits))`` to the auxiliary loss, which the trainer
scales by ``aux_loss_weight``, so a ``gs_weight`` (and ``moe.gs_lambda`` in the paper's units)
means the same on both paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from moge_ds.config import ConfigError, MoEConfig, ModelConfig
from moge_ds.topographic import default_map_shape, group_sparsity_loss

# What from_pretrained reads weights from; one of them must be in a "pretrained" model directory.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_config(path: str):
    """The model's ``PretrainedConfig`` from a local directory (never the hub)."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.hf_path {path!r} is not a Hugging Face model directory: it has no config.json "
                          f"(moge-ds reads models from local directories only)")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise ConfigError(f"model.hf_path {path}: transformers cannot read its config.json: {err}") from None


def autoep_preset(hf_config) -> str:
    """The name of DeepSpeed AutoEP's preset for the model's ``model_type``."""
    from deepspeed.module_inject.auto_ep_presets.registry import (available_preset_names, get_preset,
                                                                  preset_name_for_hf_model_type)

    name = preset_name_for_hf_model_type(hf_config.model_type)
    if name is None:
        supported = sorted(t for p in available_preset_names() for t in get_preset(p).hf_model_types)
        raise ConfigError(f"model type {hf_config.model_type!r} has no DeepSpeed AutoEP preset; the supported "
                          f"types are {supported}")
    return name


def expert_layout(hf_config) -> tuple[int, int]:
    """``(num_experts, top_k)`` of the model's MoE layers, read where its AutoEP preset says."""
    from deepspeed.module_inject.auto_ep_presets.registry import get_preset

    preset = get_preset(autoep_preset(hf_config))
    return int(getattr(hf_config, preset.num_experts_attr)), int(getattr(hf_config, preset.top_k_attr))


def has_weights(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def build(model: ModelConfig, seed: int) -> torch.nn.Module:
    """The causal LM of ``model.hf_path``: its weights (``hf_init`` "pretrained", fp32) or fresh ones."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if model.hf_init == "random":
        return AutoModelForCausalLM.from_config(read_config(model.hf_path), dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model.hf_path, local_files_only=True, dtype=torch.float32)


def router_group_sparsity(router_logits: Sequence[torch.Tensor], moe: MoEConfig, sigma: float) -> torch.Tensor:
    """Sum over MoE layers of the group-sparsity loss of each layer's router softmax.

    Args:
        router_logits: one ``[T, E]`` tensor per MoE layer, as returned by the model.
        moe: the map shape, window, stride, padding and reduction.
        sigma: the Gaussian window's width at this step (``SigmaSchedule``).
    Returns:
        A float32 scalar with gradients to the routers.
    """
    total = torch.zeros((), dtype=torch.float32, device=router_logits[0].device)
    for logits in router_logits:
        shape = tuple(moe.map_shape) if moe.map_shape else default_map_shape(logits.shape[-1])
        # fp32 softmax: under bf16 the scores of 64+ experts lose the differences the penalty acts on.
        scores = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
        total = total + group_sparsity_loss(scores, shape, moe.window_size, sigma, moe.stride, moe.padding,
                                            moe.reduction)
    return total


def moge_aux_loss(router_logits: Sequence[torch.Tensor], moe: MoEConfig, sigma: float) -> torch.Tensor:
    """MoGE's auxiliary loss, ``gs_weight * router_group_sparsity`` (the trainer scales it by
    ``aux_loss_weight``); an exact zero at ``gs_weight`` 0, so the MoE baseline's loss is HF's own."""
    if moe.gs_weight == 0:
        return torch.zeros((), dtype=torch.float32, device=router_logits[0].device)
    return moe.gs_weight * router_group_sparsity(router_logits, moe, sigma)


def causal_lm_loss(model, batch: dict[str, torch.Tensor], moe: MoEConfig,
                   sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hf_loss, l_aux)`` of one micro-batch of our LM samples (``tokens``, ``labels``, ``loss_mask``
    ``[B, S]``, labels already shifted).

    ``hf_loss`` is the model's own loss: its cross-entropy over the unmasked labels plus its
    ``router_aux_loss_coef`` times its load-balancing loss. Our labels are already shifted, so they
    go in as HF's ``shift_labels`` (HF would shift ``labels`` once more).
    """
    labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, -100)
    out = model(input_ids=batch["tokens"], labels=labels, shift_labels=labels, output_router_logits=True)
    return out.loss, moge_aux_loss(out.router_logits, moe, sigma)


def hf_state_dict(autoep_weights: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face's names from AutoEP's (global experts, as a Universal
    Checkpoint holds them).

    AutoEP keeps the router as ``<mlp>.router.<gate>`` and each fused ``gate_up_proj [E, 2F, H]``
    as ``w1`` (gate) and ``w3`` (up), each ``[E, F, H]``; ``down_proj [E, H, F]`` is ``w2``. Every
    preset here stores experts fused this way ("fused_3d"); other layouts are refused.
    """
    from deepspeed.module_inject.auto_ep_presets.registry import get_preset

    preset = get_preset(autoep_preset(hf_config))
    if preset.expert_storage != "fused_3d" or preset.expert_w3 is not None:
        raise ConfigError(f"exporting AutoEP preset {preset.preset_adapter!r} ({preset.expert_storage} experts) to "
                          f"Hugging Face is not supported: moge-ds maps fused gate_up_proj experts only")
    experts, router = f".{preset.experts_pattern}.", f".router.{preset.router_pattern}."
    weights = {}
    for name, tensor in autoep_weights.items():
        if name.endswith(experts + "w3"):
            continue
        if name.endswith(experts + "w1"):
            up = autoep_weights[name[:-2] + "w3"]
            name, tensor = name[:-2] + preset.expert_w1, torch.cat([tensor, up], dim=1)
        elif name.endswith(experts + "w2"):
            name = name[:-2] + preset.expert_w2
        weights[name.replace(router, f".{preset.router_pattern}.")] = tensor
    return weights
