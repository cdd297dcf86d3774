"""Our config, the ds_configs we ship, and the checks that tie them together."""

import json
from pathlib import Path

import pytest

from moge_ds.config import ConfigError, load_config, load_ds_config, moe_layer_indices, validate
from tests.launching import REPO

DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def cpu_ds(**changes):
    ds = load_ds_config(str(REPO / "ds_configs/cpu.json"))
    ds.update(changes)
    return ds


def preset_config(path: Path, *overrides: str):
    """A preset with its Hugging Face model directory made absolute (tests run from anywhere)."""
    config = load_config(str(path), overrides)
    if config.model.hf_path is not None:
        config.model.hf_path = str(REPO / config.model.hf_path)
    return config


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_configs_parse_with_deepspeed(path, tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    assert "_comment" in json.loads(path.read_text()), "every shipped ds_config says what it is for"
    ds = load_ds_config(str(path))
    autoep = "expert_parallel" in ds
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    # ZeRO-3 without AutoEP is for Hugging Face MoEs without a preset (OLMoE), native MoE otherwise.
    model = f"model.hf_path={REPO / 'configs/hf/olmoe_tiny'}" if stage == 3 and not autoep else "moe.ep_size=1"
    # One process: DeepSpeedConfig reads the world size from torch.distributed (1 when not launched).
    config = preset_config(REPO / "configs" / ("mixtral_tiny.yaml" if autoep or stage == 3 else "gpt_tiny.yaml"),
                           model)
    ds["expert_parallel"] = {**ds.get("expert_parallel", {}), "autoep_size": 1} if autoep else None
    ds = validate(config, {k: v for k, v in ds.items() if v is not None}, world_size=1)
    parsed = DeepSpeedConfig(ds)
    assert parsed.train_batch_size == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    assert parsed.zero_optimization_stage in ((2, 3) if autoep else (3, ) if stage == 3 else (1, 2))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_presets_load_and_validate(path):
    config = preset_config(path)
    ds = "autoep_zero3_cpu.json" if config.model.kind == "hf" else "cpu.json"
    validate(config, load_ds_config(str(REPO / "ds_configs" / ds)), world_size=2)
    assert config.moe.gs_weight > 0, "presets are MoGE; MoE is the gs_weight=0 override"


def test_hf_model_fills_experts_from_its_config():
    config = preset_config(REPO / "configs/mixtral_tiny.yaml", "moe.num_experts=4")
    validate(config, load_ds_config(str(REPO / "ds_configs/autoep_zero3_cpu.json")), world_size=2)
    assert (config.moe.num_experts, config.moe.top_k, config.moe.ep_size) == (16, 2, 2)


def autoep_ds(**autoep):
    ds = load_ds_config(str(REPO / "ds_configs/autoep_zero3_cpu.json"))
    ds["expert_parallel"].update(autoep)
    return ds


@pytest.mark.parametrize("overrides, ds, world, message", [
    (("model.hf_path=null", ), autoep_ds(), 2, "model.kind hf needs model.hf_path"),
    (("model.hf_path=/nonexistent", ), autoep_ds(), 2, "'/nonexistent' is not a Hugging Face model directory"),
    ((), cpu_ds(), 2, 'model.kind hf trains under DeepSpeed AutoEP: add "expert_parallel"'),
    ((), autoep_ds(autoep_size=3), 2, r"autoep_size 3 must divide both the world size 2 and the model's 16 "
     r"experts: allowed are \[1, 2\]"),
    ((), autoep_ds(autoep_size=2), 3, r"autoep_size 2 must divide both the world size 3 .* allowed are \[1\]"),
    ((), autoep_ds(preset_model="qwen3_moe"), 2, "preset_model 'qwen3_moe' does not fit model type 'mixtral'"),
    (("moe.ep_size=4", ), autoep_ds(), 2, r"moe.ep_size 4 is for gpt/vit; .* expert_parallel.autoep_size \(2\)"),
    (("model.hf_init=pretrained", ), autoep_ds(), 2, "model.hf_init is 'pretrained' but .* holds no weights"),
    (("model.seq_length=1024", ), autoep_ds(), 2, "model.seq_length 1024 exceeds .* max_position_embeddings 512"),
    (("moe.map_shape=[3,5]", ), autoep_ds(), 2, r"map_shape \(3, 5\) does not fit 16 experts"),
    ((f"model.hf_path={REPO / 'configs/hf/olmoe_tiny'}", ), autoep_ds(), 2,
     "'olmoe' has no DeepSpeed AutoEP preset, so its experts cannot be split over ranks: remove expert_parallel"),
    (("moe.bias_update_rate=0.001", ), autoep_ds(), 2,
     r"moe.bias_update_rate 0.001: model type 'mixtral' routes with no correction bias to move"),
    (("model.kind=gpt", "moe.bias_update_rate=0.001"), cpu_ds(), 2, "gpt routers have none: leave it at 0"),
    ((f"model.hf_path={REPO / 'configs/hf/olmoe_tiny'}", "moe.ep_size=2"),
     load_ds_config(str(REPO / "ds_configs/zero3_cpu.json")), 2, "moe.ep_size 2: model type 'olmoe' has no DeepSpeed"),
])
def test_hf_validation_errors(overrides, ds, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(preset_config(REPO / "configs/mixtral_tiny.yaml", *overrides), ds, world)


def test_hf_model_without_autoep_preset(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    config = load_config(str(REPO / "configs/mixtral_tiny.yaml"), (f"model.hf_path={tmp_path}", ))
    with pytest.raises(ConfigError, match=r"model type 'llama' has no DeepSpeed AutoEP preset and its config names no "
                       r"routed experts .* the supported types are \[.*'mixtral'.*'qwen3_moe'"):
        validate(config, autoep_ds(), 2)


def test_hf_model_whose_config_names_no_top_k(tmp_path):
    """DeepSeek-V2's default config has no num_experts_per_tok: refused by name, before any build."""
    from transformers import DeepseekV2Config

    DeepseekV2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    config = load_config(str(REPO / "configs/mixtral_tiny.yaml"), (f"model.hf_path={tmp_path}", ))
    with pytest.raises(ConfigError, match="model type 'deepseek_v2': its config sets no num_experts_per_tok"):
        validate(config, autoep_ds(), 2)


def test_autoep_refused_for_native_models():
    with pytest.raises(ConfigError, match="enables expert_parallel .* use model.kind hf"):
        validate(load_config(str(REPO / "configs/gpt_tiny.yaml")), autoep_ds(), 2)


def test_overrides_and_types():
    config = load_config(None, ("moe.gs_weight=3", "moe.placement=[0, 2]", "model.kind=vit", "moe.map_shape=[2,8]"))
    assert config.moe.gs_weight == 3.0 and isinstance(config.moe.gs_weight, float)
    assert config.moe.placement == [0, 2] and config.moe.map_shape == [2, 8]
    assert moe_layer_indices("every_other", 6) == [1, 3, 5]
    assert moe_layer_indices("last_2", 8) == [6, 7]


@pytest.mark.parametrize("override, message", [
    ("moe.gs_wieght=1", r"unknown setting moe.gs_wieght; moe has \[.*'gs_weight'"),
    ("model.kind=rnn", r"model.kind must be one of \['gpt', 'vit', 'hf'\], got 'rnn'"),
    ("moe.num_experts=many", r"moe.num_experts must be int, got 'many'"),
    ("moe.top_k", r"override 'moe.top_k' must look like section.field=value"),
    ("train.resume=1", r"train.resume must be bool, got 1"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, (override, ))


@pytest.mark.parametrize("overrides, ds_changes, world, message", [
    ((), dict(train_batch_size=64), 2, r"train_batch_size 64 != train_micro_batch_size_per_gpu 8 x "
     r"gradient_accumulation_steps 1 x world size 2 \(= 16\)"),
    ((), dict(zero_optimization={"stage": 3}), 2, "ZeRO stage 3 is not supported with DeepSpeed's native MoE"),
    (("moe.num_experts=12", "moe.ep_size=8"), {}, 8, "moe.num_experts 12 is not divisible by moe.ep_size 8"),
    (("moe.ep_size=2", ), {}, 3, "world size 3 is not divisible by moe.ep_size 2"),
    (("moe.map_shape=[3,5]", ), {}, 2, r"map_shape \(3, 5\) does not fit 16 experts"),
    (("moe.placement=[7]", ), {}, 2, r"moe.placement indices \[7\] are outside the 4 blocks"),
    ((), dict(optimiser={"type": "Adam"}), 2, r"ds_config has unknown keys \['optimiser'\]"),
])
def test_validation_errors(overrides, ds_changes, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(str(REPO / "configs/gpt_tiny.yaml"), overrides), cpu_ds(**ds_changes), world)


def test_bf16_refused_without_support():
    with pytest.raises(ConfigError, match="enables bf16 but this accelerator has no bf16 support"):
        validate(load_config(None), load_ds_config(str(REPO / "ds_configs/zero2_bf16.json")), 1,
                 bf16_supported=False)


def test_auto_fields_filled():
    config = load_config(None, ("train.steps=123", "train.output_dir=/x/run"))
    ds = validate(config, cpu_ds(gradient_accumulation_steps=2), world_size=4)
    assert ds["train_batch_size"] == 8 * 2 * 4
    assert ds["scheduler"]["params"]["total_num_steps"] == 123
    assert ds["csv_monitor"]["output_path"] == str(Path("/x/run/monitor"))


def test_missing_files():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="ds_config 'nope.json' does not exist"):
        load_ds_config("nope.json")


def test_hf_bin_weights_are_refused_under_zero3_only(tmp_path):
    """ZeRO-3 loads pretrained weights partitioned from safetensors; .bin weights are refused before
    any build, with the conversion to do, and still load under ZeRO-2 (from_pretrained)."""
    import shutil

    shutil.copy(REPO / "configs/hf/mixtral_tiny/config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    config = load_config(str(REPO / "configs/mixtral_tiny.yaml"),
                         (f"model.hf_path={tmp_path}", "model.hf_init=pretrained"))
    with pytest.raises(ConfigError, match=r"holds .bin weights, but under ZeRO-3 .* safetensors only .* convert them"):
        validate(config, autoep_ds(), 2)
    validate(config, load_ds_config(str(REPO / "ds_configs/autoep_zero2_cpu.json")), 2)


def test_hf_quantized_checkpoints_are_refused(tmp_path):
    """An FP8 checkpoint (DeepSeek-V3's official weights carry weight_scale_inv) would be loaded without its
    scales: refused at start-up, naming the method."""
    import json

    config_json = json.loads((REPO / "configs/hf/deepseek_v3_tiny/config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    config = load_config(str(REPO / "configs/mixtral_tiny.yaml"), (f"model.hf_path={tmp_path}", ))
    with pytest.raises(ConfigError, match=r"is a quantized checkpoint \(quantization_config, method 'fp8'\)"):
        validate(config, autoep_ds(), 2)
