"""Typed configuration: our settings (model, MoE/MoGE, data, training) and their checks.

Our settings live in YAML/JSON presets under ``configs/`` and are overridden on the command
line with ``--set section.field=value``. DeepSpeed's settings stay in the ds_config JSON.
:func:`validate` checks both together, once, at start-up, against the world size.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import KeysView
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad setting; the message names it and what is allowed."""


@dataclass
class MoEConfig:
    """One place for every MoE/MoGE setting. MoE and MoGE differ only in ``gs_weight`` (0 = MoE)."""

    num_experts: int = 16
    top_k: int = 2
    ep_size: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    noisy_gate_policy: Optional[str] = None
    use_rts: bool = True
    top2_2nd_expert_sampling: bool = True  # DeepSpeed's default: Gumbel-sample the 2nd expert (eval too)
    # Which blocks get an MoE FFN: "every_other" (1, 3, 5, ...), "last_2", "all", or a list of indices.
    placement: Union[str, list[int]] = "every_other"
    # Total loss = task + aux_loss_weight * sum over layers of l_aux, where
    # l_aux = load_balance + gs_weight * group_sparsity(reduction). The paper's token-summed lambda is
    # aux_loss_weight * gs_weight / T under reduction "mean" (T = tokens per MoE layer per micro-batch
    # per rank) and aux_loss_weight * gs_weight under "sum". Give the weight in one unit:
    aux_loss_weight: float = 0.01
    gs_weight: float = 0.0  # ours; 0 = vanilla MoE
    gs_lambda: Optional[float] = None  # the paper's lambda; sets gs_weight from T at start-up
    map_shape: Optional[list[int]] = None  # default: the most square (r, c)
    window_size: int = 3
    stride: int = 1
    padding: Literal["valid", "circular"] = "valid"
    reduction: Literal["sum", "mean"] = "mean"
    sigma_max: float = 10.0
    sigma_min: float = 1.0
    sigma_gamma: float = 0.2
    sigma_steps: Optional[int] = None  # length of the sigma schedule; default: train.steps
    # Auxiliary-loss-free balancing of routers with a correction bias (hf: DeepSeek-V3, MiniMax-M3): each
    # expert's e_score_correction_bias moves by this much per optimizer step against its load. 0 = off.
    bias_update_rate: float = 0.0


@dataclass
class ModelConfig:
    # gpt/vit: our models with DeepSpeed's native MoE layer. hf: a Hugging Face MoE causal LM with a
    # DeepSpeed AutoEP preset (moge_ds.hf), whose MoE blocks AutoEP replaces; its expert
    # count and top-k come from its config (moe.num_experts/top_k are filled from it).
    kind: Literal["gpt", "vit", "hf"] = "gpt"
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # GPT
    seq_length: int = 128
    positions: Literal["learned", "rotary"] = "rotary"
    tie_embeddings: bool = True
    vocab_size: Optional[int] = None  # taken from the tokenizer when None
    # Hugging Face: a local directory with config.json (and the weights when hf_init is "pretrained");
    # nothing is downloaded. "random": the config's architecture with fresh weights, for pre-training.
    hf_path: Optional[str] = None
    hf_init: Literal["pretrained", "random"] = "pretrained"
    # gpt/vit: start from the weights of this export (``moge_ds.export``, or a dense GPT upcycled by
    # ``moge_ds.upcycle``) instead of fresh ones; the optimizer starts fresh. Read at a fresh start
    # only: ``--resume`` takes every weight from the checkpoint.
    init_from: Optional[str] = None
    # ViT
    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    num_classes: int = 10


@dataclass
class DataConfig:
    # Text: megatron-core indexed datasets (prefixes), blended by weights.
    prefixes: list[str] = field(default_factory=lambda: ["data/pydoc"])
    weights: Optional[list[float]] = None
    tokenizer: str = "tokenizers/pydoc8k.model"  # sentencepiece .model, or a Hugging Face tokenizer directory
    split: str = "98,1,1"
    # Images: "fashion_mnist", "folder:<dir>" or "hf:<name>".
    images: str = "fashion_mnist"
    valid_images: int = 5000  # held out from the training images for validation
    augment: bool = True


@dataclass
class TrainConfig:
    steps: int = 300
    seed: int = 1234
    eval_interval: int = 100
    eval_batches: int = 10  # micro-batches per rank per evaluation
    final_eval: list[str] = field(default_factory=lambda: ["valid", "test"])  # whole splits, at the end
    save_interval: int = 0  # 0: save only at the end
    keep_last: int = 0  # keep the newest K checkpoints (0: all)
    log_interval: int = 10
    output_dir: str = "runs/default"
    resume: bool = False
    # Save and exit after this many steps of this invocation (0: never), e.g. to fit a cluster's
    # time limit; `--resume` continues. Like Megatron's --exit-interval.
    exit_after_steps: int = 0
    # A collective that waits longer than this fails the run (e.g. a node died) instead of hanging.
    dist_timeout_s: int = 600


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against the type ``hint`` (ints widen to floats); raise ConfigError otherwise."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
    return value


def _apply(section: Any, values: dict, prefix: str) -> None:
    hints = get_type_hints(type(section))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown setting {prefix}{key}; {prefix.rstrip('.') or 'the config'} has "
                              f"{sorted(hints)}")
        if dataclasses.is_dataclass(getattr(section, key)):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key} must be a mapping, got {value!r}")
            _apply(getattr(section, key), value, f"{prefix}{key}.")
        else:
            setattr(section, key, _coerce(value, hints[key], f"{prefix}{key}"))


def config_from_dict(values: dict) -> Config:
    """A Config from nested ``{section: {field: value}}`` (e.g. a saved ``config.to_dict()``), checked."""
    config = Config()
    _apply(config, values, "")
    return config


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> Config:
    """A preset file (YAML or JSON) plus ``section.field=value`` overrides (values parsed as YAML)."""
    config = Config()
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path!r} does not exist (presets are under configs/)")
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err} "
                              f"(indent with spaces, not tabs)") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(values).__name__}")
        _apply(config, values, "")
    return apply_overrides(config, overrides)


def apply_overrides(config: Config, overrides: tuple[str, ...]) -> Config:
    """Apply ``section.field=value`` items (values parsed as YAML) to ``config`` in place; returns it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.field=value, e.g. moe.gs_weight=0.3")
        nested: Any = _parse_value(raw)
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _apply(config, nested, "")
    return config


def _parse_value(raw: str) -> Any:
    """YAML, except that numbers parse as a user writes them (YAML 1.1 reads ``1e-3`` as a string)."""
    if not raw:
        return None
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def moe_layer_indices(placement: Union[str, list[int]], depth: int) -> list[int]:
    """The block indices that get an MoE FFN."""
    if isinstance(placement, list):
        bad = [i for i in placement if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"moe.placement indices {bad} are outside the {depth} blocks (0..{depth - 1})")
        return sorted(set(placement))
    rules = {"every_other": list(range(1, depth, 2)), "last_2": list(range(max(depth - 2, 0), depth)),
             "all": list(range(depth)), "none": []}
    if placement not in rules:
        raise ConfigError(f"moe.placement must be {sorted(rules)} or a list of block indices, got {placement!r}")
    return rules[placement]


def load_ds_config(path: str) -> dict:
    """Read a ds_config JSON file; ``_comment`` keys (our documentation) are dropped."""
    if not Path(path).is_file():
        raise ConfigError(f"ds_config {path!r} does not exist (ready-made ones are under ds_configs/)")
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"ds_config {path} is not valid JSON: {err}") from None
    return {k: v for k, v in ds.items() if not k.startswith("_")}


class _ReadRecorder(dict):
    """A dict that notes every key looked up in it, through ``[]``, ``get``, ``in`` or ``keys()``."""

    def __init__(self, values: dict, seen: set):
        super().__init__(values)
        self.seen = seen

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        return KeysView(self)  # membership goes through __contains__


def _check_with_deepspeed(ds: dict) -> None:
    """Parse ``ds`` with DeepSpeed's own ``DeepSpeedConfig``: its section models refuse misspelled nested
    keys, and the top-level keys it never reads are unknown to it (DeepSpeed ignores those silently).

    ``train_batch_size`` is left out: DeepSpeed checks it against the world size of the process group,
    which a caller may not have yet; :func:`_check_batch_and_precision` checks it against ours.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set = set()
    try:
        DeepSpeedConfig(_ReadRecorder({k: v for k, v in ds.items() if k != "train_batch_size"}, seen))
    except Exception as err:  # pydantic ValidationError, AssertionError, ValueError: all bad settings
        raise ConfigError(f"DeepSpeed refuses the ds_config: {type(err).__name__}: {str(err)[:1500]}") from None
    unknown = sorted(set(ds) - seen - {"train_batch_size"})
    if unknown:
        raise ConfigError(f"ds_config has unknown keys {unknown}: DeepSpeed would ignore them silently. "
                          f"Check the spelling against the DeepSpeed config reference")


def _check_optimizer_params(ds: dict) -> None:
    """Adam's parameters, which DeepSpeed passes to the optimizer's constructor only at initialize (a
    misspelled one is a TypeError after the model is built): checked against those constructors."""
    optimizer = ds.get("optimizer") or {}
    # json reads NaN and Infinity; torch's optimizers refuse them only inside initialize.
    for section in ("optimizer", "scheduler"):
        for name, value in ((ds.get(section) or {}).get("params") or {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"ds_config {section}.params.{name} is {value}: it must be a finite number")
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        return
    import inspect

    import torch.optim
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from deepspeed.runtime.config import ADAM_W_MODE, TORCH_ADAM_PARAM

    allowed = {TORCH_ADAM_PARAM, ADAM_W_MODE}
    for cls in (torch.optim.Adam, torch.optim.AdamW, FusedAdam, DeepSpeedCPUAdam):
        allowed |= set(inspect.signature(cls).parameters) - {"params", "model_params"}
    unknown = sorted(set(optimizer.get("params", {})) - allowed)
    if unknown:
        raise ConfigError(f"ds_config optimizer {optimizer['type']} has unknown params {unknown}: allowed are "
                          f"{sorted(allowed)}")


def fill_auto(config: Config, ds: dict, world_size: int) -> dict:
    """A copy of ``ds`` with ``"auto"`` resolved: ``train_batch_size`` (micro x accumulation x world),
    the scheduler's ``total_num_steps`` (``train.steps``), monitors' ``output_path`` (under the run dir)."""
    ds = json.loads(json.dumps(ds))
    micro = ds.get("train_micro_batch_size_per_gpu")
    if not isinstance(micro, int) or isinstance(micro, bool) or micro < 1:
        raise ConfigError(f"ds_config needs train_micro_batch_size_per_gpu as a positive integer, got {micro!r}")
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = micro * ds.get("gradient_accumulation_steps", 1) * world_size
    scheduler = ds.get("scheduler", {}).get("params", {})
    if scheduler.get("total_num_steps") == "auto":
        scheduler["total_num_steps"] = config.train.steps
    for monitor in ("tensorboard", "csv_monitor", "wandb", "comet"):
        if ds.get(monitor, {}).get("output_path") == "auto":
            ds[monitor]["output_path"] = str(Path(config.train.output_dir) / "monitor")
    return ds


def _check_batch_and_precision(ds: dict, world_size: int, bf16_supported: bool, fp16_supported: bool) -> None:
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds.get("gradient_accumulation_steps", 1)
    if ds["train_batch_size"] != micro * accum * world_size:
        raise ConfigError(f"ds_config train_batch_size {ds['train_batch_size']} != train_micro_batch_size_per_gpu "
                          f"{micro} x gradient_accumulation_steps {accum} x world size {world_size} "
                          f"(= {micro * accum * world_size}); fix one of them or set train_batch_size to \"auto\"")
    if ds.get("bf16", {}).get("enabled") and not bf16_supported:
        raise ConfigError("ds_config enables bf16 but this accelerator has no bf16 support: "
                          "use an fp16 or fp32 ds_config (e.g. ds_configs/zero2_fp16.json)")
    if ds.get("fp16", {}).get("enabled") and not fp16_supported:
        raise ConfigError("ds_config enables fp16 but this accelerator has no fp16 support: "
                          "use ds_configs/cpu.json (fp32) or a bf16 config")


def _check_hf(config: Config, ds: dict, world_size: int) -> None:
    """The Hugging Face model's own checks (``moge_ds.hf.checks``; it fills ``moe.num_experts``/``top_k``/
    ``ep_size`` from the model). Imported here, on use: it needs transformers, and it never imports this
    module, so the two do not import each other."""
    from moge_ds.hf.checks import HFModelError, check_hf

    try:
        check_hf(config, ds, world_size)
    except HFModelError as err:
        raise ConfigError(str(err)) from None


def _check_parallel(config: Config, ds: dict, world_size: int) -> None:
    moe, model = config.moe, config.model
    native_moe = model.kind != "hf" and moe_layer_indices(moe.placement, model.depth)
    if ds.get("zero_optimization", {}).get("stage", 0) == 3 and native_moe:
        raise ConfigError("ZeRO stage 3 is not supported with DeepSpeed's native MoE layers (DeepSpeed refuses "
                          "it at initialize): use ZeRO stage 1 or 2, e.g. ds_configs/zero2_bf16.json, or a "
                          "Hugging Face MoE model (model.kind hf) under AutoEP")
    if moe.ep_size < 1 or moe.num_experts % moe.ep_size:
        raise ConfigError(f"moe.num_experts {moe.num_experts} is not divisible by moe.ep_size {moe.ep_size}")
    if world_size % moe.ep_size:
        raise ConfigError(f"world size {world_size} is not divisible by moe.ep_size {moe.ep_size}: "
                          f"launch a multiple of {moe.ep_size} ranks or change moe.ep_size")


# Settings that must be >= their bound; the message names the setting and the bound.
_LOWER_BOUNDS = {"model.dim": 1, "model.depth": 1, "model.heads": 1, "model.seq_length": 1, "model.image_size": 1,
                 "model.patch_size": 1, "model.channels": 1, "model.num_classes": 2, "model.mlp_ratio": 0,
                 "model.dropout": 0, "moe.num_experts": 1, "moe.capacity_factor": 0, "moe.eval_capacity_factor": 0,
                 "moe.min_capacity": 0, "moe.aux_loss_weight": 0, "moe.gs_weight": 0, "moe.sigma_steps": 1,
                 "moe.bias_update_rate": 0,
                 "train.steps": 1, "train.eval_interval": 0, "train.eval_batches": 1, "train.save_interval": 0,
                 "train.keep_last": 0, "train.log_interval": 1, "train.exit_after_steps": 0, "train.dist_timeout_s": 1}


def check_ranges(config: Config) -> None:
    """Every setting against its lower bound (needs nothing but the config: callable before start-up)."""
    for name, bound in _LOWER_BOUNDS.items():
        section, _, key = name.partition(".")
        value = getattr(getattr(config, section), key)
        if value is not None and value < bound:
            raise ConfigError(f"{name} must be >= {bound}, got {value}")
    if config.model.dropout >= 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {config.model.dropout}")


def check_model(config: Config) -> None:
    moe, model, train = config.moe, config.model, config.train
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ConfigError(f"moe.top_k must be in [1, {moe.num_experts}], got {moe.top_k}")
    if model.dim % model.heads:
        raise ConfigError(f"model.dim {model.dim} is not divisible by model.heads {model.heads}")
    if model.kind == "vit" and model.image_size % model.patch_size:
        raise ConfigError(f"model.image_size {model.image_size} is not divisible by model.patch_size "
                          f"{model.patch_size}")
    if not set(train.final_eval) <= {"valid", "test"}:
        raise ConfigError(f"train.final_eval may list 'valid' and 'test', got {train.final_eval}")
    from moge_ds.topographic import check_map, default_map_shape

    shape = tuple(moe.map_shape) if moe.map_shape else default_map_shape(moe.num_experts)
    try:
        check_map(moe.num_experts, shape, moe.window_size, moe.stride, moe.padding)
    except ValueError as err:
        raise ConfigError(f"moe: {err}") from None
    moe_layer_indices(moe.placement, model.depth)
    _check_init_from(model, train.resume)


def _check_init_from(model: ModelConfig, resume: bool) -> None:
    if model.init_from is None:
        return
    if model.kind == "hf":
        raise ConfigError(f"model.init_from {model.init_from!r} is for our gpt/vit models: a Hugging Face model "
                          f"starts from model.hf_path with model.hf_init=pretrained")
    needed = [name for name in ("model.safetensors", "config.json") if not (Path(model.init_from) / name).is_file()]
    if needed and not resume:
        raise ConfigError(f"model.init_from {model.init_from!r} is not an export (it lacks {needed}): give a "
                          f"directory written by moge_ds.export or moge_ds.upcycle")


def tokens_per_sample(model: ModelConfig) -> int:
    """Tokens one sample sends through each MoE layer: the sequence, or the patches plus CLS."""
    return model.seq_length if model.kind != "vit" else (model.image_size // model.patch_size)**2 + 1


def resolve_gs_lambda(config: Config, micro_batch: int) -> None:
    """Set ``moe.gs_weight`` from the paper's ``moe.gs_lambda`` (tokens per MoE layer per micro-batch per rank)."""
    moe = config.moe
    if moe.gs_lambda is None:
        return
    from moge_ds.topographic import paper_lambda_to_gs_weight

    if moe.gs_lambda < 0:
        raise ConfigError(f"moe.gs_lambda must be >= 0, got {moe.gs_lambda}")
    try:
        weight = paper_lambda_to_gs_weight(moe.gs_lambda, moe.aux_loss_weight,
                                           micro_batch * tokens_per_sample(config.model), moe.reduction)
    except ValueError as err:
        raise ConfigError(f"moe.gs_lambda: {err}") from None
    # A saved config holds the resolved weight next to the lambda; anything else is two answers.
    if moe.gs_weight not in (0.0, weight):
        raise ConfigError(f"moe.gs_weight {moe.gs_weight} and moe.gs_lambda {moe.gs_lambda} are both set (the "
                          f"lambda means gs_weight {weight:g} here): give one of them")
    moe.gs_weight = weight


def validate(config: Config, ds: dict, world_size: int, bf16_supported: bool = True,
             fp16_supported: bool = True) -> dict:
    """Check our config and the ds_config together; return the ds_config with ``"auto"`` fields filled.

    Also resolves ``moe.gs_lambda`` into ``moe.gs_weight`` (see :func:`resolve_gs_lambda`).
    """
    check_ranges(config)
    ds = fill_auto(config, ds, world_size)
    _check_hf(config, ds, world_size)
    check_model(config)
    _check_batch_and_precision(ds, world_size, bf16_supported, fp16_supported)
    _check_parallel(config, ds, world_size)
    _check_with_deepspeed(ds)
    _check_optimizer_params(ds)
    resolve_gs_lambda(config, ds["train_micro_batch_size_per_gpu"])
    return ds


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m moge_ds.config --config F [--set ...] --get moe.ep_size``: print one setting (for scripts)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m moge_ds.config", description=main.__doc__)
    parser.add_argument("--config")
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--get", required=True, help="section.field")
    args, _ = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, tuple(args.set))
        section, _, name = args.get.partition(".")
        print(getattr(getattr(config, section), name))
    except (ConfigError, AttributeError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
