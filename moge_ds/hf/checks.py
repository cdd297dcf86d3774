"""Start-up checks of a Hugging Face model run (``model.kind`` hf) against the ds_config and the world
size. ``moge_ds.config.validate`` calls :func:`check_hf`; this package never imports ``moge_ds.config``,
so the two do not import each other. Errors are :class:`HFModelError`, which validate re-raises as
its ``ConfigError``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moge_ds.hf.families import Family, HFModelError, family, read_config
from moge_ds.hf.loading import SAFETENSORS_FILES, WEIGHT_FILES, has_weights

if TYPE_CHECKING:
    from moge_ds.config import Config


def check_hf(config: Config, ds: dict, world_size: int) -> None:
    """A Hugging Face model under AutoEP: a local model with a preset, its experts split evenly over
    ``autoep_size`` ranks. Fills ``moe.num_experts``/``top_k`` from the model and ``moe.ep_size``
    from ``autoep_size``, so the map checks and the checkpoint layout use them."""
    model, moe = config.model, config.moe
    autoep = ds.get("expert_parallel") or {}
    if model.kind != "hf":
        if moe.bias_update_rate > 0:
            raise HFModelError(f"moe.bias_update_rate {moe.bias_update_rate} moves the correction bias of Hugging Face "
                               f"routers that have one (DeepSeek-V3, MiniMax-M3); {model.kind} routers have none: "
                               f"leave it at 0")
        if autoep.get("enabled"):
            raise HFModelError("the ds_config enables expert_parallel (DeepSpeed AutoEP), which replaces the MoE "
                               "blocks of Hugging Face models: use model.kind hf, or remove it (gpt/vit set "
                               "moe.ep_size)")
        return
    if model.hf_path is None:
        raise HFModelError("model.kind hf needs model.hf_path: a local directory holding the model's config.json")
    hf_config = read_config(model.hf_path)
    fam = family(hf_config)
    if fam.preset is None:
        _check_plain_zero(fam, autoep, moe.ep_size)
    else:
        _check_autoep(fam, autoep, world_size, moe.ep_size)
    _check_model_directory(config, hf_config, ds.get("zero_optimization", {}).get("stage", 0))
    if moe.bias_update_rate > 0 and (fam.score_func != "sigmoid" or fam.preset is None):
        raise HFModelError(f"moe.bias_update_rate {moe.bias_update_rate}: model type {fam.model_type!r} routes with "
                           f"no correction bias to move (only the sigmoid routers of DeepSeek-V3 and MiniMax-M3 "
                           f"under AutoEP have one): leave it at 0")
    moe.num_experts, moe.top_k, moe.ep_size = fam.num_experts, fam.top_k, autoep.get("autoep_size", 1)


def _check_plain_zero(fam: Family, autoep: dict, ep_size: int) -> None:
    """A family without an AutoEP preset trains under plain ZeRO: no expert_parallel, no ep_size."""
    if autoep.get("enabled"):
        raise HFModelError(f"model type {fam.model_type!r} has no DeepSpeed AutoEP preset, so its experts cannot be "
                           f"split over ranks: remove expert_parallel from the ds_config to train it under plain "
                           f"ZeRO data parallelism (e.g. ds_configs/zero3_bf16.json)")
    if ep_size != 1:
        raise HFModelError(f"moe.ep_size {ep_size}: model type {fam.model_type!r} has no DeepSpeed AutoEP preset, "
                           f"so its experts are not split over ranks; leave moe.ep_size at 1")


def _check_autoep(fam: Family, autoep: dict, world_size: int, ep_size: int) -> None:
    """AutoEP is on, with the family's preset and an ``autoep_size`` that splits the experts evenly."""
    if not autoep.get("enabled"):
        raise HFModelError(f'model.kind hf trains under DeepSpeed AutoEP: add "expert_parallel": {{"enabled": true, '
                           f'"autoep_size": N, "preset_model": "{fam.preset}"}} to the ds_config (autoep_size 1: '
                           f'data parallel only), e.g. ds_configs/autoep_zero3_bf16.json')
    if autoep.get("preset_model") not in (None, fam.preset):
        raise HFModelError(f"ds_config expert_parallel.preset_model {autoep['preset_model']!r} does not fit model "
                           f"type {fam.model_type!r}: use {fam.preset!r}")
    size = autoep.get("autoep_size", 1)
    allowed = [n for n in range(1, world_size + 1) if world_size % n == 0 and fam.num_experts % n == 0]
    if size not in allowed or isinstance(size, bool):
        raise HFModelError(f"ds_config expert_parallel.autoep_size {size!r} must divide both the world size "
                           f"{world_size} and the model's {fam.num_experts} experts: allowed are {allowed}")
    if ep_size not in (1, size):
        raise HFModelError(f"moe.ep_size {ep_size} is for gpt/vit; a Hugging Face model's expert parallelism is "
                           f"expert_parallel.autoep_size ({size}) in the ds_config")


def _check_model_directory(config: Config, hf_config, zero_stage: int) -> None:
    """The weights a "pretrained" run loads exist (safetensors under ZeRO-3, which loads them partitioned);
    the sequence fits the model's positions."""
    model = config.model
    quantization = getattr(hf_config, "quantization_config", None)
    if quantization:
        fields = quantization if isinstance(quantization, dict) else vars(quantization)
        method = fields.get("quant_method", "?")
        raise HFModelError(f"{model.hf_path} is a quantized checkpoint (quantization_config, method {method!r}): its "
                           f"weights come with scales that training and partitioned loading do not apply; give a "
                           f"bf16 or fp32 copy (e.g. dequantized once with transformers and save_pretrained)")
    if model.hf_init == "pretrained" and not has_weights(model.hf_path):
        raise HFModelError(f"model.hf_init is 'pretrained' but {model.hf_path} holds no weights (none of "
                           f"{list(WEIGHT_FILES)}): add them, or set model.hf_init=random to pre-train")
    if model.hf_init == "pretrained" and zero_stage == 3 and not has_weights(model.hf_path, SAFETENSORS_FILES):
        raise HFModelError(f"{model.hf_path} holds .bin weights, but under ZeRO-3 moge-ds loads pretrained models "
                           f"partitioned from safetensors only ({list(SAFETENSORS_FILES)}): convert them once with "
                           f"from_pretrained(...).save_pretrained(dir), or use ZeRO-1/2")
    positions = getattr(hf_config, "max_position_embeddings", None)
    if positions is not None and model.seq_length > positions:
        raise HFModelError(f"model.seq_length {model.seq_length} exceeds the model's max_position_embeddings "
                           f"{positions}")
