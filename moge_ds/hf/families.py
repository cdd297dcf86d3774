"""What moge-ds needs to know about each Hugging Face MoE family, read from the model's config and
DeepSpeed AutoEP's preset for its ``model_type`` (one source for both: the preset is what AutoEP
itself replaces the MoE blocks by). A MoE family without a preset (OLMoE, GPT-OSS) is described from
its config alone and trains under plain ZeRO, its experts not split over ranks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class HFModelError(ValueError):
    """A Hugging Face model moge-ds cannot train; the message names the model and what would be needed."""


@dataclass(frozen=True)
class Family:
    """One HF MoE family's facts.

    Attributes:
        model_type: the config's ``model_type``.
        preset: DeepSpeed AutoEP's preset name for it; None: it has none (plain ZeRO, no expert parallelism).
        num_experts: routed experts per MoE layer (shared experts not counted: they are not on the map).
        top_k: experts each token is routed to.
        score_func: how the router turns its logits into scores: ``"softmax"`` or ``"sigmoid"``.
        moe_layer_pattern: regex of the MoE blocks' module names (``model.layers.N.mlp``).
        router_names: the router's attribute name in an HF MoE block (``gate``; GPT-OSS ``router``).
    """

    model_type: str
    preset: str | None
    num_experts: int
    top_k: int
    score_func: Literal["softmax", "sigmoid"]
    moe_layer_pattern: str
    router_names: tuple[str, ...]


# Where a family without an AutoEP preset keeps its MoE layout: the config attributes of its routed
# experts and top-k, and its MoE blocks and routers (HF's layout, as in the presets).
EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_ATTR = "num_experts_per_tok"
MOE_LAYER_PATTERN = r"model\.layers\.\d+\.mlp"
ROUTER_NAMES = ("gate", "router")


def read_config(path: str):
    """The model's ``PretrainedConfig`` from a local directory (never the hub)."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise HFModelError(f"model.hf_path {path!r} is not a Hugging Face model directory: it has no config.json "
                           f"(moge-ds reads models from local directories only)")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise HFModelError(f"model.hf_path {path}: transformers cannot read its config.json: {err}") from None


def autoep_preset_name(hf_config) -> str:
    """The name of DeepSpeed AutoEP's preset for the model's ``model_type`` (HFModelError if none)."""
    from deepspeed.module_inject.auto_ep_presets.registry import preset_name_for_hf_model_type

    name = preset_name_for_hf_model_type(hf_config.model_type)
    if name is None:
        raise HFModelError(f"model type {hf_config.model_type!r} has no DeepSpeed AutoEP preset; "
                           f"{_preset_facts(hf_config.model_type)}")
    return name


def _preset_facts(model_type: str) -> str:
    """The types AutoEP has presets for, and DeepSpeed's note on ``model_type`` if it has one (e.g. the
    vision-language Qwen3.5-MoE / MiniMax-M3, whose text backbone has a preset)."""
    from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS, available_preset_names, get_preset

    notes = [p.unsupported_hf_model_type_notes[model_type] for p in PRESET_MODELS.values()
             if model_type in p.unsupported_hf_model_type_notes]
    supported = sorted(t for p in available_preset_names() for t in get_preset(p).hf_model_types)
    return f"the supported types are {supported}" + (f". DeepSpeed says: {notes[0]}" if notes else "")


def family(hf_config) -> Family:
    """The facts of the model's family, from its config and its AutoEP preset (or its config alone)."""
    from deepspeed.module_inject.auto_ep_presets.registry import get_preset, preset_name_for_hf_model_type

    if preset_name_for_hf_model_type(hf_config.model_type) is None:
        return _family_without_preset(hf_config)
    name = autoep_preset_name(hf_config)
    preset = get_preset(name)
    layout = {attr: getattr(hf_config, attr, None) for attr in (preset.num_experts_attr, preset.top_k_attr)}
    unset = [attr for attr, value in layout.items() if not isinstance(value, int) or value < 1]
    if unset:
        raise HFModelError(f"model type {hf_config.model_type!r}: its config sets no {' or '.join(unset)} "
                           f"(got {layout}), so it has no routed experts for MoGE: set them in its config.json")
    return Family(model_type=hf_config.model_type, preset=name, num_experts=layout[preset.num_experts_attr],
                  top_k=layout[preset.top_k_attr], score_func=preset.score_func,
                  moe_layer_pattern=preset.moe_layer_pattern, router_names=(preset.router_pattern, ))


def _family_without_preset(hf_config) -> Family:
    """A MoE family AutoEP has no preset for, from the expert layout its config names. A config that
    names none (a dense model, a vision-language wrapper) is refused with the preset list."""
    counts = [getattr(hf_config, attr, None) for attr in EXPERT_COUNT_ATTRS]
    experts = next((count for count in counts if isinstance(count, int)), None)
    top_k = getattr(hf_config, TOP_K_ATTR, None)
    if not (isinstance(experts, int) and experts > 1 and isinstance(top_k, int) and 1 <= top_k <= experts):
        raise HFModelError(f"model type {hf_config.model_type!r} has no DeepSpeed AutoEP preset and its config names "
                           f"no routed experts ({' or '.join(EXPERT_COUNT_ATTRS)} > 1 and {TOP_K_ATTR}), so it is not "
                           f"a MoE moge-ds can train; {_preset_facts(hf_config.model_type)}")
    score_func = getattr(hf_config, "scoring_func", "softmax")
    if score_func not in ("softmax", "sigmoid"):
        raise HFModelError(f"model type {hf_config.model_type!r}: its router's scoring_func {score_func!r} is "
                           f"neither softmax nor sigmoid, the two MoGE defines map values for")
    return Family(model_type=hf_config.model_type, preset=None, num_experts=experts, top_k=top_k,
                  score_func=score_func, moe_layer_pattern=MOE_LAYER_PATTERN, router_names=ROUTER_NAMES)
