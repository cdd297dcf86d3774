"""Transformer pieces shared by both models, and the one factory that picks dense / MoE / MoGE."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moge_ds.config import ModelConfig, MoEConfig, moe_layer_indices
from moge_ds.layer import MoGE
from moge_ds.topographic import SigmaSchedule


class MLP(nn.Module):
    """``dim -> hidden -> dim`` with GELU: the dense FFN, and each expert."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class DenseFFN(MLP):
    """An MLP with the FFN interface: returns ``(output, l_aux=0)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x), x.new_zeros(())


class MoEFFN(nn.Module):
    """A MoGE layer (vanilla DeepSpeed-MoE when ``gs_weight == 0``) with the FFN interface."""

    def __init__(self, dim: int, hidden: int, moe: MoEConfig, sigma_steps: int, dropout: float = 0.0):
        super().__init__()
        sigma = SigmaSchedule(sigma_steps, moe.sigma_max, moe.sigma_min, moe.sigma_gamma)
        self.moe = MoGE(dim, MLP(dim, hidden, dropout), num_experts=moe.num_experts, ep_size=moe.ep_size,
                        k=moe.top_k, capacity_factor=moe.capacity_factor,
                        eval_capacity_factor=moe.eval_capacity_factor, min_capacity=moe.min_capacity,
                        noisy_gate_policy=moe.noisy_gate_policy, drop_tokens=moe.drop_tokens, use_rts=moe.use_rts,
                        top2_2nd_expert_sampling=moe.top2_2nd_expert_sampling,
                        gs_weight=moe.gs_weight, map_shape=tuple(moe.map_shape) if moe.map_shape else None,
                        window_size=moe.window_size, sigma=sigma, stride=moe.stride, padding=moe.padding,
                        reduction=moe.reduction)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, l_aux, _ = self.moe(x)
        return out, l_aux


def build_ffn(layer: int, model: ModelConfig, moe: MoEConfig, sigma_steps: int) -> nn.Module:
    """The FFN of block ``layer``: MoE/MoGE where ``moe.placement`` puts one, dense elsewhere."""
    hidden = int(model.dim * model.mlp_ratio)
    if layer in moe_layer_indices(moe.placement, model.depth):
        return MoEFFN(model.dim, hidden, moe, sigma_steps, model.dropout)
    return DenseFFN(model.dim, hidden, model.dropout)


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[seq_len, head_dim]`` for rotary position embeddings."""
    inv_freq = 1.0 / base**(torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, S, D]`` by position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, causal: bool, dropout: float = 0.0):
        super().__init__()
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            cos, sin = (t[:s].to(x.dtype) for t in rotary)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-norm transformer block; ``forward`` returns ``(x, l_aux)``."""

    def __init__(self, layer: int, model: ModelConfig, moe: MoEConfig, sigma_steps: int, causal: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(model.dim)
        self.attn = Attention(model.dim, model.heads, causal, model.dropout)
        self.norm2 = nn.LayerNorm(model.dim)
        self.ffn = build_ffn(layer, model, moe, sigma_steps)

    def forward(self, x: torch.Tensor, rotary=None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm1(x), rotary)
        h, l_aux = self.ffn(self.norm2(x))
        return x + h, l_aux


def init_experts(model: nn.Module, seed: int, ep_rank: int) -> None:
    """Initialise every local expert from its *global* index, so experts differ across ranks and a
    model gets the same expert weights whatever its expert-parallel size."""
    for layer, ffn in enumerate(m for m in model.modules() if isinstance(m, MoEFFN)):
        experts = ffn.moe.deepspeed_moe.experts.deepspeed_experts
        for local, expert in enumerate(experts):
            global_index = ep_rank * len(experts) + local
            gen = torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + global_index)
            with torch.no_grad():
                for name, param in expert.named_parameters():
                    if name.endswith("bias"):
                        param.zero_()
                    else:
                        param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
