"""The training loss of a Hugging Face MoE causal LM: the model's own loss plus MoGE's term.

The term has the native gate's form (``moge_ds.gate``): each MoE layer contributes
``gs_weight * group_sparsity_loss(map values)`` to the auxiliary loss, which the trainer scales by
``aux_loss_weight``, so a ``gs_weight`` (and ``moe.gs_lambda`` in the paper's units) means the same
on both paths. The router logits come from hooks (``moge_ds.hf.routers``); each rank's router is
replicated, so they cover all E experts and the term needs no communication.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import torch

from moge_ds.hf.families import family
from moge_ds.hf.routers import RouterLogits, unwrap
from moge_ds.topographic import PoolingCache, default_map_shape, pooled_group_sparsity

if TYPE_CHECKING:
    from moge_ds.config import MoEConfig


def map_values(logits: torch.Tensor, score_func: Literal["softmax", "sigmoid"]) -> torch.Tensor:
    """The router's scores as MoGE's map values ``[T, E]`` (fp32), from its raw logits ``[T, E]``.

    Softmax routers: their softmax, as on the native path. Sigmoid routers (DeepSeek-V3, MiniMax-M3)
    score each expert on its own, in (0, 1); their scores normalised to sum 1 over the routed experts
    are the same kind of distribution over the map as a softmax, so the group-sparsity term and its
    units (a gs_weight, a paper lambda) carry over, and a token's map reflects the ranking the router
    selects by. Shared experts are not routed and not on the map; group-limited selection and the
    correction bias only pick experts and stay the model's own.
    """
    # fp32: under bf16 the scores of 64+ experts lose the differences the penalty acts on.
    logits = logits.float()
    if score_func == "softmax":
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / scores.sum(dim=-1, keepdim=True)


def router_group_sparsity(router_logits: Sequence[torch.Tensor], moe: MoEConfig, sigma: float,
                          score_func: Literal["softmax", "sigmoid"] = "softmax",
                          pooling: PoolingCache | None = None) -> torch.Tensor:
    """Sum over MoE layers of the group-sparsity loss of each layer's map values.

    Args:
        router_logits: one raw ``[T, E]`` tensor per MoE layer.
        moe: the map shape, window, stride, padding and reduction.
        sigma: the Gaussian window's width at this step (``SigmaSchedule``).
        score_func: the router's, see :func:`map_values`.
        pooling: the caller's cache of the pooling matrix (a training task keeps one); None: built here.
    Returns:
        A float32 scalar with gradients to the routers.
    """
    experts, device = router_logits[0].shape[-1], router_logits[0].device
    shape = tuple(moe.map_shape) if moe.map_shape else default_map_shape(experts)
    matrix = (pooling or PoolingCache())(shape, moe.window_size, sigma, moe.stride, moe.padding, device)
    return sum((pooled_group_sparsity(map_values(logits, score_func), matrix, moe.reduction)
                for logits in router_logits), torch.zeros((), device=device))


def moge_aux_loss(router_logits: Sequence[torch.Tensor], moe: MoEConfig, sigma: float,
                  score_func: Literal["softmax", "sigmoid"] = "softmax",
                  pooling: PoolingCache | None = None) -> torch.Tensor:
    """MoGE's auxiliary loss, ``gs_weight * router_group_sparsity`` (the trainer scales it by
    ``aux_loss_weight``); an exact zero at ``gs_weight`` 0, so the MoE baseline's loss is HF's own."""
    if moe.gs_weight == 0:
        return torch.zeros((), dtype=torch.float32, device=router_logits[0].device)
    return moe.gs_weight * router_group_sparsity(router_logits, moe, sigma, score_func, pooling)


def load_balance_loss(model: torch.nn.Module, router_logits: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``router_aux_loss_coef`` times the model's own load-balancing loss on the raw router logits, as its
    forward adds it with ``output_router_logits``; None for a family without one (DeepSeek-V2/V3).

    Computed here from the hooked logits rather than by the model: under AutoEP, DeepSpeed's
    Qwen3.5-MoE layer hands the model softmaxed logits, which its loss would softmax again.
    """
    hf_model = unwrap(model)
    balance = getattr(sys.modules[type(hf_model).__module__], "load_balancing_loss_func", None)
    if balance is None or not hasattr(hf_model, "router_aux_loss_coef"):
        return None
    aux = balance(tuple(router_logits), hf_model.num_experts, hf_model.num_experts_per_tok, None)
    return hf_model.router_aux_loss_coef * aux


@dataclass
class RoutingRecord:
    """What one micro-batch's routing looked like, detached, for the run's history (never for gradients)."""

    map_values: list[torch.Tensor]  # per MoE layer, the map values ``[T, E]`` (noise-free: HF routers add none)
    top_k: int  # experts each token is routed to
    load_balance_loss: torch.Tensor | None  # the model's own term (router_aux_loss_coef included); None: none
    group_sparsity_loss: torch.Tensor | None  # MoGE's term per layer, unweighted (mean over layers); None: MoE
    sigma: float


def causal_lm_loss(model, batch: dict[str, torch.Tensor], moe: MoEConfig, sigma: float,
                   pooling: PoolingCache | None = None) -> tuple[torch.Tensor, torch.Tensor, RoutingRecord]:
    """``(hf_loss, l_aux, record)`` of one micro-batch of our LM samples (``tokens``, ``labels``,
    ``loss_mask`` ``[B, S]``, labels already shifted); ``pooling`` as in :func:`router_group_sparsity`.

    ``hf_loss`` is the model's own loss: its cross-entropy over the unmasked labels plus its
    ``router_aux_loss_coef`` times its load-balancing loss (:func:`load_balance_loss`). Our labels are
    already shifted, so they go in as HF's ``shift_labels`` (HF would shift ``labels`` once more).
    """
    hf_model = unwrap(model)
    fam = family(hf_model.config)
    labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, -100)
    # The load-balancing term is added below, once, whatever the config's output_router_logits says.
    own_balance = {"output_router_logits": False} if hasattr(hf_model.config, "output_router_logits") else {}
    with RouterLogits(model, fam) as routers:
        out = model(input_ids=batch["tokens"], labels=labels, shift_labels=labels, **own_balance)
    balance = load_balance_loss(model, routers.logits)
    hf_loss = out.loss if balance is None else out.loss + balance.to(out.loss.device)
    l_aux = moge_aux_loss(routers.logits, moe, sigma, fam.score_func, pooling)
    with torch.no_grad():
        values = [map_values(logits.detach(), fam.score_func) for logits in routers.logits]
    per_layer = l_aux.detach() / (moe.gs_weight * len(values)) if moe.gs_weight > 0 else None
    record = RoutingRecord(values, fam.top_k, None if balance is None else balance.detach(), per_layer, sigma)
    return hf_loss, l_aux, record
