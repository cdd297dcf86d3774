"""AutoEP's parameter names -> Hugging Face's, for exporting a trained AutoEP model."""

from __future__ import annotations

import torch

from moge_ds.hf.families import HFModelError, autoep_preset_name, family


def hf_state_dict(autoep_weights: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face's names from AutoEP's (global experts, as a Universal
    Checkpoint holds them).

    AutoEP keeps the router's linear as ``<mlp>.router.<gate>`` and its buffers (DeepSeek-V3's and
    MiniMax-M3's ``e_score_correction_bias``) as ``<mlp>.router.<buffer>``, which HF keeps on
    ``<mlp>.<gate>``; each fused ``gate_up_proj [E, 2F, H]`` as ``w1`` (gate) and ``w3`` (up), each
    ``[E, F, H]``; ``down_proj [E, H, F]`` is ``w2``; the shared experts and their gate, whatever HF
    calls them (Qwen's ``shared_expert``/``shared_expert_gate``), are AutoEP's ``shared_experts`` and
    ``shared_experts_gate``. Every preset here stores experts fused this way ("fused_3d"); other
    layouts are refused. A family without a preset trained without AutoEP: its
    names are already Hugging Face's.
    """
    from deepspeed.module_inject.auto_ep_presets.registry import get_preset

    if family(hf_config).preset is None:
        return dict(autoep_weights)
    preset = get_preset(autoep_preset_name(hf_config))
    if preset.expert_storage != "fused_3d" or preset.expert_w3 is not None:
        raise HFModelError(f"exporting AutoEP preset {preset.preset_adapter!r} ({preset.expert_storage} experts) to "
                           f"Hugging Face is not supported: moge-ds maps fused gate_up_proj experts only")
    experts, gate = f".{preset.experts_pattern}.", f".{preset.router_pattern}."
    weights = {}
    for name, tensor in autoep_weights.items():
        if name.endswith(experts + "w3"):
            continue
        if name.endswith(experts + "w1"):
            up = autoep_weights[name[:-2] + "w3"]
            name, tensor = name[:-2] + preset.expert_w1, torch.cat([tensor, up], dim=1)
        elif name.endswith(experts + "w2"):
            name = name[:-2] + preset.expert_w2
        weights[_shared_names(name.replace(".router" + gate, gate).replace(".router.", gate), preset)] = tensor
    return weights


def _shared_names(name: str, preset) -> str:
    """AutoEP's ``shared_experts``/``shared_experts_gate`` under the model's own names."""
    for autoep, own in ((".shared_experts_gate.", preset.shared_experts_gate_pattern),
                        (".shared_experts.", preset.shared_experts_pattern)):
        if own:
            name = name.replace(autoep, f".{own}.")
    return name
