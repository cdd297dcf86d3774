"""Capture what every MoGE gate does on probe inputs, through forward hooks on an exported model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moge_ds.gate import MoGEGate, moge_gates


@dataclass
class LayerRouting:
    inputs: torch.Tensor  # [T, d] gate inputs (the MoE layer's tokens)
    scores: torch.Tensor  # [T, E] noise-free softmax scores
    topk: torch.Tensor  # [T, k] the experts routed to (capacity drops included)
    dropped: torch.Tensor  # [T, k] bool: routes evicted by the capacity limit


@torch.no_grad()
def capture_routing(model: torch.nn.Module, batches) -> list[LayerRouting]:
    """Run ``model`` on each input of ``batches`` and return the concatenated routing of each MoE layer."""
    gates = moge_gates(model)
    captured: list[list[tuple]] = [[] for _ in gates]

    def hook(index: int):

        def record(gate: MoGEGate, args, output) -> None:
            x = args[0].float()
            scores = gate.last_scores
            indices = output[3].t().long()  # [T, k]; -1 marks a dropped route
            topk = scores.topk(gate.k, dim=-1).indices
            # DeepSpeed's top-2 may sample its 2nd choice, so take the routed experts where kept.
            routed = torch.where(indices >= 0, indices, topk)
            captured[index].append((x, scores, routed, indices < 0))

        return record

    handles = [g.register_forward_hook(hook(i)) for i, g in enumerate(gates)]
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return [LayerRouting(*(torch.cat(parts) for parts in zip(*layer))) for layer in captured]
