"""MoGE for Hugging Face MoE models: the group-sparsity term from the router logits they return.

A Hugging Face MoE model (Mixtral, Qwen3-MoE, DeepSeek-V2/V3), plain or with its MoE blocks
replaced by DeepSpeed AutoEP, returns one ``[T, E]`` router-logit tensor per MoE layer when called
with ``output_router_logits=True``. The router is replicated on every rank, so these are the
logits over all E experts: MoGE's term needs no communication and no change to DeepSpeed.

The term has the native gate's form (``moge_ds.gate``): each layer adds
``gs_weight * group_sparsity_loss(softmax(logits))`` to its auxiliary loss, which the trainer scales
by ``aux_loss_weight``, so a ``gs_weight`` (and ``moe.gs_lambda`` in the paper's units) means the
same on both paths.
"""

from __future__ import annotations

from typing import Sequence

import torch

from moge_ds.config import MoEConfig
from moge_ds.topographic import default_map_shape, group_sparsity_loss


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


def moge_loss(hf_loss: torch.Tensor, router_logits: Sequence[torch.Tensor], moe: MoEConfig,
              sigma: float) -> torch.Tensor:
    """HF's own training loss plus MoGE's term, ``aux_loss_weight * gs_weight * router_group_sparsity``.

    With ``gs_weight`` 0 this is HF's loss itself (the same tensor), so the MoE baseline trains on
    exactly the loss Hugging Face defines, its load-balancing term included.
    """
    if moe.gs_weight == 0:
        return hf_loss
    term = router_group_sparsity(router_logits, moe, sigma)
    return hf_loss + (moe.aux_loss_weight * moe.gs_weight) * term.to(hf_loss.dtype)
