"""A GPT-style decoder LM: token embedding, pre-norm causal blocks, tied output head."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moge_ds.config import ModelConfig, MoEConfig
from moge_ds.models.blocks import Block, rotary_tables


class GPT(nn.Module):
    """``forward(tokens [B, S]) -> (logits [B, S, V], l_aux scalar)``; l_aux sums the MoE layers'."""

    def __init__(self, model: ModelConfig, moe: MoEConfig, sigma_steps: int, vocab_size: Optional[int] = None):
        super().__init__()
        vocab_size = vocab_size or model.vocab_size
        if vocab_size is None:
            raise ValueError("GPT needs a vocab_size (from the tokenizer or model.vocab_size)")
        self.config = model
        self.embed = nn.Embedding(vocab_size, model.dim)
        self.pos = nn.Embedding(model.seq_length, model.dim) if model.positions == "learned" else None
        if model.positions == "rotary":
            cos, sin = rotary_tables(model.seq_length, model.dim // model.heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(model.dropout)
        self.blocks = nn.ModuleList(Block(i, model, moe, sigma_steps, causal=True) for i in range(model.depth))
        self.norm = nn.LayerNorm(model.dim)
        self.head = nn.Linear(model.dim, vocab_size, bias=False)
        if model.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        rotary = (self.rope_cos, self.rope_sin) if self.pos is None else None
        x = self.drop(x)
        l_aux = x.new_zeros(())
        for block in self.blocks:
            x, block_aux = block(x, rotary)
            l_aux = l_aux + block_aux
        return self.head(self.norm(x)), l_aux


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
