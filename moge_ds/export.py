"""Turn a training checkpoint into a standalone model: ``model.safetensors`` + ``config.json``.

    python -m moge_ds.export runs/gpt_tiny/checkpoints --out runs/gpt_tiny/export

The export is fp32, holds every expert (``ep_size`` 1), needs neither DeepSpeed's engine nor
torch.distributed to load, and contains no pickle. The tokenizer is copied beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from moge_ds.checkpoint import CheckpointError, checkpoint_dir, consolidated_state_dict, load_weights, read_state
from moge_ds.config import Config, ConfigError, config_from_dict
from moge_ds.models import build_model

MODEL_FILE = "model.safetensors"


def _standalone(config: Config) -> Config:
    """The same model on one process: all experts local."""
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, ep_size=1))


def export(checkpoint: Path, out: Path) -> Path:
    """Write ``out``/{model.safetensors, config.json, tokenizer.model}; returns ``out``."""
    tag_dir = checkpoint_dir(checkpoint)
    state = read_state(tag_dir)
    config = _standalone(config_from_dict(state["config"]))
    vocab_size = None
    if config.model.kind == "gpt":
        vocab_size = config.model.vocab_size or consolidated_state_dict(tag_dir)["embed.weight"].shape[0]
        config.model.vocab_size = vocab_size
    model = build_model(config, vocab_size)
    load_weights(model, consolidated_state_dict(tag_dir), str(tag_dir))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (MODEL_FILE + ".tmp")
    save_model(model, str(tmp))
    tmp.replace(out / MODEL_FILE)
    if config.model.kind == "gpt" and Path(config.data.tokenizer).is_file():
        shutil.copyfile(config.data.tokenizer, out / "tokenizer.model")
        config.data.tokenizer = str(out / "tokenizer.model")
    (out / "config.json").write_text(json.dumps({"config": config.to_dict(), "step": state["step"],
                                                 "source": str(tag_dir)}, indent=1))
    return out


def load_export(path: Path) -> tuple[torch.nn.Module, Config]:
    """The model (eval mode, CPU) and config of an export directory."""
    if not (path / MODEL_FILE).is_file() or not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not an export: it needs {MODEL_FILE} and config.json "
                              f"(make one with `python -m moge_ds.export`)")
    try:
        config = config_from_dict(json.loads((path / "config.json").read_text())["config"])
    except (json.JSONDecodeError, KeyError, ConfigError) as err:
        raise CheckpointError(f"{path / 'config.json'} is not a moge-ds export config: {err}") from None
    model = build_model(config, config.model.vocab_size)
    try:
        load_model(model, str(path / MODEL_FILE))
    except Exception as err:  # safetensors raises several types for truncation and mismatch
        raise CheckpointError(f"{path / MODEL_FILE} does not load into the model of {path / 'config.json'}: "
                              f"{err}") from None
    return model.eval(), config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moge_ds.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoints root (newest complete tag) or a step<N> dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except CheckpointError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {out / MODEL_FILE} and {out / 'config.json'}")


if __name__ == "__main__":
    main()
