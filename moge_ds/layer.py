"""MoGE: ``deepspeed.moe.layer.MoE`` with its gate replaced by :class:`MoGEGate`.

Everything else (experts, all-to-all, expert-parallel groups, residual MoE, expert tensor
parallelism, DeepSpeed's MoE optimizer groups) is DeepSpeed's own, unchanged.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from moge_ds.gate import MoGEGate
from moge_ds.topographic import Padding, Reduction, SigmaSchedule, check_map, default_map_shape


class MoGE(MoE):
    """A drop-in for ``deepspeed.moe.layer.MoE``; ``forward`` returns ``(output, l_aux, exp_counts)``.

    Takes MoE's arguments plus MoGEGate's regulariser arguments (``gs_weight``, ``map_shape``,
    ``window_size``, ``sigma``, ``stride``, ``padding``, ``reduction``). ``gs_weight=0`` is
    vanilla DeepSpeed-MoE.
    """

    def __init__(self,
                 hidden_size: int,
                 expert: nn.Module,
                 num_experts: int = 1,
                 ep_size: int = 1,
                 k: int = 1,
                 capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4,
                 use_residual: bool = False,
                 noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True,
                 use_rts: bool = True,
                 use_tutel: bool = False,
                 enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True,
                 gs_weight: float = 0.0,
                 map_shape: Optional[tuple[int, int]] = None,
                 window_size: int = 3,
                 sigma: Union[float, SigmaSchedule] = 1.0,
                 stride: int = 1,
                 padding: Padding = "valid",
                 reduction: Reduction = "mean") -> None:
        if num_experts < 1 or ep_size < 1 or num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be a positive multiple of ep_size ({ep_size})")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
        if noisy_gate_policy not in (None, 'None', 'Jitter', 'RSample'):
            raise ValueError(f"noisy_gate_policy must be None, 'Jitter' or 'RSample', got {noisy_gate_policy!r}")
        check_map(num_experts, tuple(map_shape) if map_shape else default_map_shape(num_experts), window_size, stride,
                  padding)
        super().__init__(hidden_size, expert, num_experts, ep_size, k, capacity_factor, eval_capacity_factor,
                         min_capacity, use_residual, noisy_gate_policy, drop_tokens, use_rts, use_tutel,
                         enable_expert_tensor_parallelism, top2_2nd_expert_sampling)
        vanilla_gate = self.deepspeed_moe.gate
        # fork_rng keeps the global RNG stream where vanilla MoE leaves it, so a model built
        # with MoGE layers initialises every other parameter exactly as with MoE layers.
        with torch.random.fork_rng(devices=[]):
            gate = MoGEGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                            noisy_gate_policy, drop_tokens, use_rts, None, top2_2nd_expert_sampling,
                            gs_weight=gs_weight, map_shape=map_shape, window_size=window_size, sigma=sigma,
                            stride=stride, padding=padding, reduction=reduction)
        gate.wg = vanilla_gate.wg
        self.deepspeed_moe.gate = gate

    @property
    def gate(self) -> MoGEGate:
        return self.deepspeed_moe.gate
