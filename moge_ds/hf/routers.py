"""Router logits of a Hugging Face MoE model, captured by forward hooks: one way for every family,
plain or after DeepSpeed AutoEP replaced its MoE blocks.

The hooks sit on each MoE layer's router linear map and keep its raw output ``[T, E]``, before any
softmax or sigmoid. What the models return as ``router_logits`` is not that everywhere: under AutoEP,
DeepSpeed's Qwen3.5-MoE layer returns them already softmaxed, and DeepSeek-V2/V3 return none.
"""

from __future__ import annotations

import re

import torch

from moge_ds.hf.families import Family, HFModelError


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (or the model itself)."""
    from deepspeed import DeepSpeedEngine

    return model.module if isinstance(model, DeepSpeedEngine) else model


def is_hf_model(model: torch.nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(unwrap(model), PreTrainedModel)


def moe_blocks(model: torch.nn.Module, fam: Family) -> list[torch.nn.Module]:
    """Each MoE block (``model.layers.N.mlp``), in layer order: AutoEP's replacement or HF's own block
    with a router. Dense layers that share the MoE blocks' name (DeepSeek's first layers, Qwen's
    ``mlp_only_layers``) have no router and are skipped."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    pattern = re.compile(fam.moe_layer_pattern)
    blocks = [block for name, block in unwrap(model).named_modules() if pattern.fullmatch(name) and
              (isinstance(block, AutoEPMoELayer) or any(hasattr(block, n) for n in fam.router_names))]
    if not blocks:
        raise HFModelError(f"model type {fam.model_type!r}: no MoE router found (no module matching "
                           f"{fam.moe_layer_pattern!r} with a router named {' or '.join(fam.router_names)}); moge-ds "
                           f"needs Hugging Face's MoE layout (model.layers.N.mlp.gate)")
    return blocks


def router_modules(model: torch.nn.Module, fam: Family) -> list[torch.nn.Module]:
    """Each MoE layer's router, in layer order: AutoEP's ``router.gate`` linear (returns the logits)
    or HF's router (``mlp.gate``, GPT-OSS ``mlp.router``; returns ``(logits, weights, indices)``)."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return [block.router.gate if isinstance(block, AutoEPMoELayer) else
            getattr(block, next(n for n in fam.router_names if hasattr(block, n))) for block in moe_blocks(model, fam)]


class RouterLogits:
    """Context manager around one forward: ``logits`` then holds each MoE layer's raw router logits
    ``[T, E]`` (T tokens of this rank's micro-batch, E routed experts), with their autograd graph.

    Only a layer's first router call counts: DeepSpeed's Qwen3.5-MoE layer calls its router a second
    time to return (softmaxed) logits. The hooks are removed on exit, so a recomputing backward
    (activation checkpointing) does not capture again. Diagnostics must take ``.detach()``ed copies:
    an extra autograd pass through the engine's outputs breaks ZeRO-2's backward hooks.
    """

    def __init__(self, model: torch.nn.Module, fam: Family):
        self.routers = router_modules(model, fam)
        self.num_experts = fam.num_experts
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, index: int):
        def keep_first(module, inputs, output):
            if index not in self._captured:
                self._captured[index] = output[0] if isinstance(output, tuple) else output
        return keep_first

    def __enter__(self) -> RouterLogits:
        self._captured.clear()
        self._handles = [router.register_forward_hook(self._hook(i)) for i, router in enumerate(self.routers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def logits(self) -> list[torch.Tensor]:
        """``[T, E]`` per MoE layer, in layer order."""
        missing = [i for i in range(len(self.routers)) if i not in self._captured]
        if missing:
            raise RuntimeError(f"MoE layers {missing} did not call their router in this forward")
        logits = [self._captured[i].reshape(-1, self._captured[i].shape[-1]) for i in range(len(self.routers))]
        if logits[0].shape[-1] != self.num_experts:
            raise RuntimeError(f"the routers return {logits[0].shape[-1]} scores, not one per each of the "
                               f"{self.num_experts} experts")
        return logits
