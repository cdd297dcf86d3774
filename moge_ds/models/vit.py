"""A ViT classifier: patch embedding, class token, pre-norm blocks, linear head on the class token."""

from __future__ import annotations


import torch
from torch import nn

from moge_ds.config import ModelConfig, MoEConfig
from moge_ds.models.blocks import Block


class ViT(nn.Module):
    """``forward(images [B, C, H, W] float) -> (logits [B, num_classes], l_aux scalar)``."""

    def __init__(self, model: ModelConfig, moe: MoEConfig, sigma_steps: int):
        super().__init__()
        self.config = model
        num_patches = (model.image_size // model.patch_size)**2
        self.patch = nn.Conv2d(model.channels, model.dim, model.patch_size, stride=model.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, model.dim))
        self.pos = nn.Parameter(torch.randn(1, num_patches + 1, model.dim) * 0.02)
        self.drop = nn.Dropout(model.dropout)
        self.blocks = nn.ModuleList(Block(i, model, moe, sigma_steps, causal=False) for i in range(model.depth))
        self.norm = nn.LayerNorm(model.dim)
        self.head = nn.Linear(model.dim, model.num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.drop(x)
        l_aux = x.new_zeros(())
        for block in self.blocks:
            x, block_aux = block(x)
            l_aux = l_aux + block_aux
        return self.head(self.norm(x[:, 0])), l_aux
