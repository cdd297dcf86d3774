"""Capture what every MoE layer's router does on probe inputs, through forward hooks on an exported
model: our MoGE gates, or a Hugging Face model's routers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moge_ds.gate import MoGEGate, moge_gates
from moge_ds.hf.families import family
from moge_ds.hf.loss import map_values
from moge_ds.hf.routers import is_hf_model, router_modules


@dataclass
class LayerRouting:
    inputs: torch.Tensor  # [T, d] gate inputs (the MoE layer's tokens)
    scores: torch.Tensor  # [T, E] noise-free scores (a Hugging Face router's MoGE map values)
    topk: torch.Tensor  # [T, k] the experts routed to (capacity drops included)
    dropped: torch.Tensor  # [T, k] bool: routes evicted by the capacity limit


def _run_hooked(model, modules: list[torch.nn.Module], record, batches, forward) -> list[LayerRouting]:
    """``forward(model, batch)`` over ``batches`` with ``record(index, module, args, output)`` hooked on
    each of ``modules`` (returning one ``LayerRouting`` part); the parts concatenated per module."""
    captured: list[list[tuple]] = [[] for _ in modules]
    handles = [m.register_forward_hook(lambda m, a, o, i=i: captured[i].append(record(m, a, o)))
               for i, m in enumerate(modules)]
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return [LayerRouting(*(torch.cat(parts) for parts in zip(*layer))) for layer in captured]


@torch.no_grad()
def capture_routing(model: torch.nn.Module, batches) -> list[LayerRouting]:
    """Run ``model`` on each input of ``batches`` and return the concatenated routing of each MoE layer."""
    if is_hf_model(model):
        return _capture_hf(model, batches)

    def record(gate: MoGEGate, args, output) -> tuple:
        scores = gate.last_scores
        indices = output[3].t().long()  # [T, k]; -1 marks a dropped route
        topk = scores.topk(gate.k, dim=-1).indices
        # DeepSpeed's top-2 may sample its 2nd choice, so take the routed experts where kept.
        routed = torch.where(indices >= 0, indices, topk)
        return args[0].float(), scores, routed, indices < 0

    return _run_hooked(model, moge_gates(model), record, batches, lambda m, batch: m(batch))


def _capture_hf(model: torch.nn.Module, batches) -> list[LayerRouting]:
    """A Hugging Face MoE causal LM: each router's input, its MoGE map values (softmax or normalised
    sigmoid of its raw logits) and the experts it chose (its own choice: correction bias and group
    limits included); dropless, so nothing is dropped."""
    fam = family(model.config)

    def record(router, args, output) -> tuple:
        logits = output[0] if isinstance(output, tuple) else output
        scores = map_values(logits.reshape(-1, fam.num_experts), fam.score_func)
        chosen = output[2] if isinstance(output, tuple) else scores.topk(fam.top_k, dim=-1).indices
        chosen = chosen.reshape(-1, fam.top_k).long()
        return args[0].reshape(len(scores), -1).float(), scores, chosen, torch.zeros_like(chosen, dtype=torch.bool)

    return _run_hooked(model, router_modules(model, fam), record, batches, lambda m, batch: m(input_ids=batch))
