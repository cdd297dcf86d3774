"""Turn a training checkpoint into a standalone model: ``model.safetensors`` + ``config.json``.

    python -m moge_ds.export runs/gpt_tiny/checkpoints --out runs/gpt_tiny/export

The export is fp32, holds every expert (``ep_size`` 1), needs neither DeepSpeed's engine nor
torch.distributed to load, and contains no pickle. The tokenizer is copied beside it. A Hugging
Face model (``model.kind`` hf) exports as a ``save_pretrained`` directory for ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from moge_ds.checkpoint import CheckpointError, check_new_dir, checkpoint_dir, read_state, staged_dir
from moge_ds.config import Config, ConfigError, config_from_dict
from moge_ds.hf.families import HFModelError
from moge_ds.models import build_model
from moge_ds.universal import ds_to_universal

MODEL_FILE = "model.safetensors"
HF_RUN_CONFIG = "moge_ds_config.json"  # our config beside a Hugging Face export's own config.json

_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
_LOCAL_EXPERT = re.compile(r"\.deepspeed_experts\.(\d+)\.")  # an expert weight's name, local index in it


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights from one checkpoint, experts under their *global* index.

    DeepSpeed stores non-expert weights in ``mp_rank_00_model_states.pt`` and each expert in its
    own ``layer_<L>_expert_<global>_...`` file (keys already name the global index), whatever the
    expert-parallel size, so the result loads into a model built with ``ep_size=1``.
    """
    main_file = tag_dir / "mp_rank_00_model_states.pt"
    if not main_file.is_file():
        raise CheckpointError(f"{main_file} is missing: not a DeepSpeed checkpoint directory")
    try:
        weights = dict(torch.load(main_file, map_location="cpu", weights_only=True)["module"])
        for file in sorted(tag_dir.iterdir()):
            if _EXPERT_FILE.match(file.name):
                weights.update(torch.load(file, map_location="cpu", weights_only=True))
    except (RuntimeError, EOFError, KeyError) as err:
        raise CheckpointError(f"cannot read {tag_dir}: {type(err).__name__}: {err} (truncated or not a "
                              f"checkpoint?)") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with a clear error naming ``source`` and the mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{source} does not match this model: {len(missing)} missing (e.g. {missing[:3]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), shape mismatches {shapes[:3]}")
    model.load_state_dict(weights)


def _standalone(config: Config) -> Config:
    """The same model on one process: all experts local, its own weights (not those it started from)."""
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, ep_size=1),
                               model=dataclasses.replace(config.model, init_from=None))


def universal_weights(tag_dir: Path, work: Path) -> dict[str, torch.Tensor]:
    """Every fp32 weight of a checkpoint by name, experts global, via DeepSpeed's Universal Checkpoint
    conversion (the expert-aware way to consolidate AutoEP's ZeRO-2/3 partitions) into ``work``.
    ZeRO-3 weights come out flat. The conversion writes Adam's two moments too: ``work`` needs about
    3x the fp32 weights' size on disk while it lasts."""
    ds_to_universal(tag_dir, work)
    weights = {}
    for param_dir in sorted(p for p in (work / "zero").iterdir() if p.is_dir()):
        saved = torch.load(param_dir / "fp32.pt", map_location="cpu", weights_only=True)
        weights[param_dir.name] = saved["param"] if isinstance(saved, dict) else saved
    return weights


def module_buffers(tag_dir: Path, exclude: set[str]) -> dict[str, torch.Tensor]:
    """The module's tensors that a Universal Checkpoint leaves out, its buffers (DeepSeek-V3's and
    MiniMax-M3's ``e_score_correction_bias``), from rank 0's model states: buffers are never
    partitioned, so that file holds them whole under any ZeRO stage. ``exclude``: the parameters."""
    files = [tag_dir / "mp_rank_00_model_states.pt", tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    main_file = next((f for f in files if f.is_file()), None)
    if main_file is None:
        raise CheckpointError(f"{tag_dir} holds neither of {[f.name for f in files]}: not a DeepSpeed checkpoint")
    module = torch.load(main_file, map_location="cpu", weights_only=True)["module"]
    return {name: tensor for name, tensor in module.items() if name not in exclude}


def export_hf(tag_dir: Path, config: Config, out: Path) -> None:
    """A Hugging Face model directory (``save_pretrained``: safetensors + config.json) of an hf-kind run."""
    from moge_ds.hf.export_names import hf_state_dict
    from moge_ds.hf.loading import build

    with tempfile.TemporaryDirectory(prefix="universal_", dir=out) as work:  # inside the staged export
        autoep_weights = universal_weights(tag_dir, Path(work) / "universal")
    autoep_weights = {**module_buffers(tag_dir, exclude=set(autoep_weights)), **autoep_weights}
    model = build(dataclasses.replace(config.model, hf_init="random"), config.train.seed)
    own = model.state_dict()
    weights = {k: v for k, v in hf_state_dict(autoep_weights, model.config).items() if k in own}
    # ZeRO-3 stores weights flat; a tied head is one weight stored once.
    weights = {k: v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() else v
               for k, v in weights.items()}
    for name in set(own) - set(weights):
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            weights[name] = weights["model.embed_tokens.weight"]
    load_weights(model, weights, str(tag_dir))
    model.save_pretrained(out, safe_serialization=True)


def export(checkpoint: Path, out: Path) -> Path:
    """Write ``out``/{model.safetensors, config.json, tokenizer.model}; returns ``out``.

    An hf-kind run exports as a Hugging Face model directory that ``from_pretrained`` loads.
    """
    tag_dir = checkpoint_dir(checkpoint)
    _check_new_directory(out)
    state = read_state(tag_dir)
    config = _standalone(config_from_dict(state["config"]))
    with staged_dir(out) as staging:
        if config.model.kind == "hf":
            _write_hf(tag_dir, config, state, staging, out)
        else:
            _write_native(tag_dir, config, state, staging, out)
    return out


def _check_new_directory(out: Path) -> None:
    """An export is a new directory: never into a run, a checkpoint, a model or an earlier export."""
    if (out / MODEL_FILE).exists():
        raise CheckpointError(f"{out} already holds an export ({MODEL_FILE}): give another --out or remove it "
                              f"(nothing is overwritten)")
    check_new_dir(out, "an export")


def _write_hf(tag_dir: Path, config: Config, state: dict, staging: Path, out: Path) -> None:
    export_hf(tag_dir, config, staging)
    _copy_tokenizer(config, staging, out)
    config.model.hf_path, config.model.hf_init = str(out), "pretrained"
    (staging / HF_RUN_CONFIG).write_text(json.dumps({"config": config.to_dict(), "step": state["step"],
                                                     "source": str(tag_dir)}, indent=1))


def _write_native(tag_dir: Path, config: Config, state: dict, staging: Path, out: Path) -> None:
    weights = consolidated_state_dict(tag_dir)
    if config.model.kind == "gpt":
        config.model.vocab_size = config.model.vocab_size or weights["embed.weight"].shape[0]
    model = build_model(config, config.model.vocab_size)
    load_weights(model, weights, str(tag_dir))
    write_native(model, config, staging, out, {"step": state["step"], "source": str(tag_dir)})


def write_native(model: torch.nn.Module, config: Config, staging: Path, out: Path, record: dict) -> None:
    """An export of our model into ``staging`` (renamed to ``out`` by the caller): weights, tokenizer,
    and config.json holding our config and ``record`` (the step and source it came from)."""
    save_model(model, str(staging / MODEL_FILE))
    if config.model.kind == "gpt":
        _copy_tokenizer(config, staging, out)
    (staging / "config.json").write_text(json.dumps({"config": config.to_dict(), **record}, indent=1))


def _copy_tokenizer(config: Config, staging: Path, out: Path) -> None:
    """The run's sentencepiece model beside the export; ``config`` then points at the copy (in
    ``out``, where ``staging`` will be renamed to)."""
    if Path(config.data.tokenizer).is_file():
        shutil.copyfile(config.data.tokenizer, staging / "tokenizer.model")
        config.data.tokenizer = str(out / "tokenizer.model")


def load_export(path: Path) -> tuple[torch.nn.Module, Config]:
    """The model (eval mode, CPU) and config of an export directory."""
    if (path / HF_RUN_CONFIG).is_file():
        config = config_from_dict(json.loads((path / HF_RUN_CONFIG).read_text())["config"])
        config.model.hf_path = str(path)
        return build_model(config).eval(), config
    config = export_config(path)
    model = build_model(config, config.model.vocab_size)
    try:
        load_model(model, str(path / MODEL_FILE))
    except Exception as err:  # safetensors raises several types for truncation and mismatch
        raise CheckpointError(f"{path / MODEL_FILE} does not load into the model of {path / 'config.json'}: "
                              f"{err}") from None
    return model.eval(), config


def export_config(path: Path) -> Config:
    """The config of our model's export in ``path`` (refused unless it is one)."""
    if not (path / MODEL_FILE).is_file() or not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not an export: it needs {MODEL_FILE} and config.json "
                              f"(make one with `python -m moge_ds.export`)")
    try:
        return config_from_dict(json.loads((path / "config.json").read_text())["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{path / 'config.json'} is not a moge-ds export config: {err}") from None


def init_from_export(model: torch.nn.Module, path: Path, ep_rank: int, ep_size: int) -> None:
    """Load an export's weights into a freshly built ``model`` (``model.init_from``). The export holds
    every expert under its global index; a rank of an expert-parallel group takes its own slice
    (local expert ``i`` of ``ep_rank`` is global ``ep_rank * E_local + i``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    export_config(path)  # a clear error if it is not an export
    try:
        stored = load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {path / MODEL_FILE}: {err}") from None
    names, twins = _one_name_per_tensor(model.state_dict(), stored)
    local_experts = len({m.group(1) for m in map(_LOCAL_EXPERT.search, names) if m})

    def global_name(name: str, rank: int) -> str:
        return _LOCAL_EXPERT.sub(lambda m: f".deepspeed_experts.{rank * local_experts + int(m.group(1))}.", name)

    every_rank = {global_name(name, rank) for name in names for rank in range(ep_size)}
    missing = sorted(every_rank - set(stored))
    unexpected = sorted(set(stored) - every_rank)
    if missing or unexpected:
        raise CheckpointError(f"the export {path} (model.init_from) does not match this model: {len(missing)} "
                              f"weights missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
                              f"{unexpected[:3]}); compare its config.json with the run's model and moe settings")
    weights = {name: stored[global_name(name, ep_rank)] for name in names}
    weights.update((tied, weights[twin]) for tied, twin in twins.items())
    load_weights(model, weights, f"{path} (model.init_from)")


def _one_name_per_tensor(state: dict[str, torch.Tensor], stored: dict) -> tuple[list[str], dict[str, str]]:
    """The state's names with one name per shared tensor (a tied head is stored once, under either
    name), preferring the stored name; and each dropped name -> the name it shares a tensor with."""
    kept: dict[int | str, str] = {}
    twins: dict[str, str] = {}
    for name, tensor in state.items():
        key = tensor.data_ptr() or name  # an empty tensor has no storage to share
        first = kept.setdefault(key, name)
        if first != name:
            keep, drop = (name, first) if name in stored and first not in stored else (first, name)
            kept[key] = keep
            twins[drop] = keep
    return list(kept.values()), twins


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moge_ds.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoints root (newest complete tag) or a step<N> dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except (CheckpointError, ConfigError, HFModelError) as err:  # e.g. an hf run whose model directory is gone
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {out / MODEL_FILE} and {out / 'config.json'}")


if __name__ == "__main__":
    main()
