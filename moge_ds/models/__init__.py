"""GPT-style LM and ViT classifier whose FFNs are dense, MoE or MoGE per block; Hugging Face MoE LMs."""

import torch

from moge_ds.config import Config
from moge_ds.hf.loading import build as build_hf
from moge_ds.models.blocks import init_experts
from moge_ds.models.gpt import GPT
from moge_ds.models.vit import ViT

__all__ = ["GPT", "ViT", "build_model"]


def build_model(config: Config, vocab_size: int | None = None, ep_rank: int = 0,
                ds: dict | None = None) -> torch.nn.Module:
    """The model ``config.model.kind`` names, MoE/MoGE FFNs where ``config.moe.placement`` says
    (``hf``: the Hugging Face model, whose MoE blocks AutoEP replaces at ``deepspeed.initialize``; in
    the training dtype of the ds_config ``ds`` and, under ZeRO-3, built and loaded as partitions).

    Non-expert weights come from ``config.train.seed``; experts from their global index
    (``ep_rank`` = this rank's place in its expert-parallel group), see ``init_experts``.
    """
    if config.model.kind == "hf":
        return build_hf(config.model, config.train.seed, ds)
    torch.manual_seed(config.train.seed)
    sigma_steps = config.moe.sigma_steps or config.train.steps  # the schedule spans the run by default
    if config.model.kind == "gpt":
        model = GPT(config.model, config.moe, sigma_steps, vocab_size)
    else:
        model = ViT(config.model, config.moe, sigma_steps)
    init_experts(model, config.train.seed, ep_rank)
    return model
