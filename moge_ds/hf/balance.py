"""Auxiliary-loss-free load balancing for routers with a correction bias (DeepSeek-V3, MiniMax-M3).

transformers gives DeepSeek-V3 no load-balancing loss, and DeepSpeed AutoEP takes the bias as a
fixed buffer, so without this a MoE baseline on such a model trains unbalanced. DeepSeek-V3's rule
(Megatron-core calls the bias "expert bias"): after each optimizer step, every routed expert's
``e_score_correction_bias`` moves by a fixed ``rate`` against its load, ``+rate`` if it received
fewer tokens than the mean over experts and ``-rate`` if more, counted over the step's micro-batches
on all ranks. The bias only steers which experts are chosen, never the weights given to them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moge_ds.hf.families import Family, HFModelError
from moge_ds.hf.routers import moe_blocks


class CorrectionBiasBalancer:
    """Counts each MoE layer's routed tokens in training forwards (hooks on AutoEP's routers, whose
    outputs include the per-expert token counts of the choice they made, bias and group limits
    included) and moves the biases in :meth:`step`, identically on every rank."""

    def __init__(self, model: torch.nn.Module, fam: Family, rate: float):
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

        self.routers = [block.router for block in moe_blocks(model, fam) if isinstance(block, AutoEPMoELayer)]
        if not self.routers or not all(hasattr(r, "e_score_correction_bias") for r in self.routers):
            raise HFModelError(f"model type {fam.model_type!r}: moe.bias_update_rate needs AutoEP routers with an "
                               f"e_score_correction_bias (DeepSeek-V3, MiniMax-M3 under expert_parallel)")
        self.rate = rate
        # fp32 copies carry the steps: a bf16 bias near 1 cannot take a step of 1e-3 (its spacing is 8e-3).
        self.biases = [r.e_score_correction_bias.detach().float().clone() for r in self.routers]
        self.counts = torch.zeros(len(self.routers), fam.num_experts, dtype=torch.float64,
                                  device=self.biases[0].device)
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, layer: int):
        def count(module, inputs, output):
            if module.training:  # evaluation forwards do not steer training
                self.counts[layer] += output[2].to(self.counts.dtype)  # (scores, experts, tokens per expert [E])
        return count

    def step(self) -> torch.Tensor:
        """Move every layer's bias by ``rate * sign(mean load - load)`` (a collective: all ranks call it
        after each optimizer step); returns the step's loads ``[L, E]`` over all ranks, then starts anew."""
        loads = self.counts.clone()
        self.counts.zero_()
        if dist.is_initialized():
            dist.all_reduce(loads)
        offsets = torch.sign(loads.mean(dim=-1, keepdim=True) - loads)
        with torch.no_grad():
            for router, bias, offset in zip(self.routers, self.biases, offsets):
                bias.add_(self.rate * offset.float())
                router.e_score_correction_bias.copy_(bias)
        return loads

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
