"""Upcycle a dense GPT export of ours (``moge_ds.export``) into a GPT with MoE/MoGE blocks.

Each chosen block's dense FFN (``fc1``/``fc2`` with biases) becomes E expert copies behind a new
router; the rest is copied. DeepSpeed's gate renormalises the top-k weights to sum to 1 for k >= 2,
so with exact copies and no dropped token the MoE block computes the dense FFN: the upcycled
model's logits equal the dense model's. Exactness needs k >= 2 (DeepSpeed's top-1 gate scales
the expert's output by its router probability, 1/E at a zeros router) and no token dropping, so
the written config sets ``moe.drop_tokens`` false; a run that turns dropping on starts inexact.

Our GPTs are small enough to convert in memory (the Hugging Face path streams). The output is an
export: ``model.init_from=DIR`` starts a run from it, ``moge_ds.evaluate DIR`` scores it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from moge_ds.checkpoint import CheckpointError, staged_dir
from moge_ds.config import Config, ConfigError, check_model, moe_layer_indices
from moge_ds.export import export_config, load_export, load_weights, write_native
from moge_ds.models import build_model
from moge_ds.upcycle.common import Options, Upcycler, UpcycleError

_EXPERT = re.compile(r"^(blocks\.\d+\.ffn)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.\d+\.(.+)$")
_ROUTER = re.compile(r"^blocks\.\d+\.ffn\.moe\.deepspeed_moe\.gate\.wg\.weight$")
INIT_STD = 0.02  # our GPT's initialisation std (models/gpt.py): the default std of a "normal" router


def is_export(src: Path) -> bool:
    """Whether ``src`` is an export of our model (its config.json holds our config)."""
    try:
        export_config(src)
    except CheckpointError:
        return False
    return True


def moe_config(dense: Config, opts: Options) -> Config:
    """The dense config with E experts, top-k, no token dropping, in the blocks ``--placement`` names."""
    if dense.model.kind != "gpt":
        raise UpcycleError(f"the export holds a {dense.model.kind!r} model: our upcycling takes a GPT")
    if moe_layer_indices(dense.moe.placement, dense.model.depth):
        raise UpcycleError(f"the export already has MoE blocks (moe.placement {dense.moe.placement!r}): "
                           f"upcycling takes a dense GPT (moe.placement none)")
    if opts.top_k < 2:
        raise UpcycleError(f"--top-k {opts.top_k}: DeepSpeed's top-1 gate scales the expert output by its router "
                           f"probability (not renormalised), so the upcycled model would not equal the dense one; "
                           f"give --top-k 2 or more")
    moe = dataclasses.replace(dense.moe, num_experts=opts.num_experts, top_k=opts.top_k, ep_size=1,
                              drop_tokens=False, placement=opts.placement or "all", map_shape=None)
    config = dataclasses.replace(dense, moe=moe)
    try:
        check_model(config)
    except ConfigError as err:
        raise UpcycleError(f"the upcycled model's settings are invalid: {err}") from None
    return config


def upcycled_weights(dense: dict[str, torch.Tensor], names: list[str], upcycler: Upcycler) -> dict[str, torch.Tensor]:
    """The MoE model's weights (``names``, in order) from the dense ones: expert copies, new routers."""
    weights, copies = {}, {}
    for name in names:
        expert = _EXPERT.match(name)
        if expert is not None:
            dense_name = f"{expert.group(1)}.{expert.group(2)}"
            if dense_name not in copies:
                copies[dense_name] = iter(upcycler.expert_copies(upcycler.cast(dense[dense_name])))
            weights[name] = next(copies[dense_name])
        elif _ROUTER.match(name):
            weights[name] = upcycler.router(dense["embed.weight"].shape[1], upcycler.cast(dense["embed.weight"]).dtype)
        else:
            weights[name] = upcycler.cast(dense[name])
    return weights


def upcycle_gpt(src: Path, out: Path, opts: Options) -> Path:
    """Write the MoE GPT export of the dense GPT export in ``src`` to the new directory ``out``."""
    if opts.dtype not in ("auto", "float32"):
        raise UpcycleError(f"--dtype {opts.dtype}: our exports are float32 (training casts per the ds_config)")
    dense_model, dense = load_export(src)
    config = moe_config(dense, opts)
    model = build_model(config, config.model.vocab_size)
    names = list(model.state_dict())
    weights = upcycled_weights(dense_model.state_dict(), names, Upcycler(opts, INIT_STD))
    load_weights(model, weights, f"the upcycled {src}")
    with staged_dir(out) as staging:
        write_native(model, config, staging, out, {"step": 0, "source": str(src),
                                                   "upcycled": dataclasses.asdict(opts)})
    return out
