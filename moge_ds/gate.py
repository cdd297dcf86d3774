"""MoGEGate: DeepSpeed's TopKGate plus the group-sparsity regulariser.

Routing is DeepSpeed's own (``top1gating``/``top2gating``/``topkgating``), called on the
same logits with the same arguments, so capacity, token dropping, noisy gating and RTS
behave exactly as in vanilla DeepSpeed-MoE. The only change is the returned ``l_aux``:
``load_balance_loss + gs_weight * group_sparsity_loss``. The logits are ``[T, E_global]``
on every rank, so the regulariser needs no communication.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import (TOPK_GATE_TIMER, TopKGate, multiplicative_jitter, top1gating, top2gating,
                                       topkgating)

from moge_ds.topographic import (Padding, PoolingCache, Reduction, SigmaSchedule, check_map, default_map_shape,
                                 pooled_group_sparsity)


class MoGEGate(TopKGate):
    """A drop-in for ``deepspeed.moe.sharded_moe.TopKGate`` with MoGE's regulariser.

    Extra arguments (the rest are TopKGate's):
        gs_weight: lambda, the weight of the group-sparsity loss inside ``l_aux``. 0 gives
            vanilla TopKGate (the regulariser is then not computed at all).
        map_shape: ``(r, c)`` topographic map, ``r * c == num_experts``; default most square.
        window_size, stride, padding, reduction: see :func:`moge_ds.topographic.group_sparsity_loss`.
        sigma: a fixed kernel width, or a :class:`SigmaSchedule` advanced by :meth:`set_step`.

    After each forward, ``last_load_balance_loss`` and ``last_group_sparsity_loss`` hold the
    detached terms for logging (the latter is None when ``gs_weight == 0``), and ``last_scores``
    the detached noise-free softmax ``[T, E]`` for the topography metrics.

    ``forward`` follows DeepSpeed 0.19.8's ``TopKGate.forward`` line for line (timers, fp32
    logits, jitter, the three gating functions); whoever upgrades DeepSpeed re-checks it against
    the new ``TopKGate.forward`` (``tests/test_gate.py`` compares the two bit for bit).
    """

    def __init__(self,
                 model_dim: int,
                 num_experts: int,
                 k: int = 1,
                 capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0,
                 min_capacity: int = 8,
                 noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True,
                 use_rts: bool = True,
                 ep_group: Union[torch.distributed.ProcessGroup, None] = None,
                 top2_2nd_expert_sampling: bool = True,
                 gs_weight: float = 0.0,
                 map_shape: Optional[tuple[int, int]] = None,
                 window_size: int = 3,
                 sigma: Union[float, SigmaSchedule] = 1.0,
                 stride: int = 1,
                 padding: Padding = "valid",
                 reduction: Reduction = "mean") -> None:
        super().__init__(model_dim, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                         noisy_gate_policy, drop_tokens, use_rts, ep_group, top2_2nd_expert_sampling)
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
        if gs_weight < 0:
            raise ValueError(f"gs_weight must be >= 0, got {gs_weight}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.map_shape = tuple(map_shape) if map_shape is not None else default_map_shape(num_experts)
        check_map(num_experts, self.map_shape, window_size, stride, padding)
        self.gs_weight = float(gs_weight)
        self.window_size = window_size
        self.stride = stride
        self.padding = padding
        self.reduction = reduction
        self.sigma_schedule = sigma if isinstance(sigma, SigmaSchedule) else None
        self.sigma = self.sigma_schedule.value(0) if self.sigma_schedule else float(sigma)
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        self._pooling = PoolingCache()
        self.last_load_balance_loss: Optional[torch.Tensor] = None
        self.last_group_sparsity_loss: Optional[torch.Tensor] = None
        self.last_scores: Optional[torch.Tensor] = None

    def set_step(self, step: int) -> None:
        """Move the sigma schedule (if any) to training step ``step``."""
        if self.sigma_schedule is not None:
            self.sigma = self.sigma_schedule.value(step)

    def pooling(self, device: torch.device) -> torch.Tensor:
        """The ``[E, P]`` pooling matrix for the current sigma, rebuilt only when sigma changes."""
        return self._pooling(self.map_shape, self.window_size, self.sigma, self.stride, self.padding, device)

    def forward(self,
                input: torch.Tensor,
                used_token: Optional[torch.Tensor] = None,
                sparse_routes: bool = False,
                use_tutel: bool = False):
        """Same signature and return tuple as ``TopKGate.forward``; ``input`` is ``[T, model_dim]``."""
        if self.wall_clock_breakdown:
            self.timers(TOPK_GATE_TIMER).start()

        input_fp32 = input.float()
        weight = self.wg.weight.float()
        jitter = self.noisy_gate_policy == 'Jitter' and self.training
        logits = F.linear(multiplicative_jitter(input_fp32, device=input.device) if jitter else input_fp32, weight)
        # The regulariser and the topography metrics see noise-free scores: with input jitter that
        # takes a second, clean matmul. top2gating adds Gumbel noise to the logits in place, so
        # softmax before routing. Vanilla MoE (gs_weight 0) builds no graph for them.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.gs_weight > 0):
            scores = F.softmax(F.linear(input_fp32, weight) if jitter else logits, dim=1)
        self.last_scores = scores.detach()

        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            gate_output = top1gating(logits, capacity_factor, self.min_capacity, used_token,
                                     self.noisy_gate_policy if self.training else None, self.drop_tokens,
                                     self.use_rts, self.ep_group, sparse_routes, use_tutel)
        elif self.k == 2:
            gate_output = top2gating(logits, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group,
                                     self.top2_2nd_expert_sampling, sparse_routes)
        else:
            gate_output = topkgating(logits, self.k, capacity_factor, self.min_capacity, self.drop_tokens,
                                     self.ep_group, sparse_routes=sparse_routes)

        load_balance_loss = gate_output[0]
        self.last_load_balance_loss = load_balance_loss.detach()
        if self.gs_weight > 0:
            if used_token is not None:
                scores = scores * used_token.unsqueeze(1).to(scores.dtype)
            gs_loss = pooled_group_sparsity(scores, self.pooling(scores.device), self.reduction)
            self.last_group_sparsity_loss = gs_loss.detach()
            gate_output = (load_balance_loss + self.gs_weight * gs_loss, ) + tuple(gate_output[1:])

        if self.wall_clock_breakdown:
            self.timers(TOPK_GATE_TIMER).stop()
            self.gate_time = self.timers(TOPK_GATE_TIMER).elapsed(reset=False)
        return gate_output


def moge_gates(module: torch.nn.Module) -> list[MoGEGate]:
    """Every MoGEGate inside ``module``, in registration order."""
    return [m for m in module.modules() if isinstance(m, MoGEGate)]


def set_sigma_step(module: torch.nn.Module, step: int) -> None:
    """Advance the sigma schedule of every MoGEGate in ``module`` to ``step``."""
    for gate in moge_gates(module):
        gate.set_step(step)
