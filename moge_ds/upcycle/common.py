"""What both upcycling paths share: the options, their checks, and the seeded initialiser of
expert copies and routers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from moge_ds.checkpoint import CheckpointError, check_new_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UpcycleError(ValueError):
    """A request that cannot be upcycled; the message names the value and the fix."""


@dataclass(frozen=True)
class Options:
    num_experts: int
    top_k: int
    router_init: str = "zeros"
    router_std: Optional[float] = None  # None: the source's initialisation std
    seed: int = 0
    noise: float = 0.0
    dtype: str = "auto"
    placement: Optional[str] = None  # our GPT only: which blocks get experts (None: all)


def check_options(opts: Options, out: Path) -> None:
    """Refuse bad numbers and an existing ``out`` before anything is read."""
    if opts.num_experts < 1:
        raise UpcycleError(f"--num-experts {opts.num_experts}: give at least 1")
    if not 1 <= opts.top_k <= opts.num_experts:
        raise UpcycleError(f"--top-k {opts.top_k}: give a value in [1, {opts.num_experts}] (--num-experts)")
    if not (math.isfinite(opts.noise) and opts.noise >= 0):  # NaN would write NaN weights
        raise UpcycleError(f"--noise {opts.noise}: give a finite value >= 0 (0: exact expert copies)")
    if opts.router_std is not None and not (math.isfinite(opts.router_std) and opts.router_std >= 0):
        raise UpcycleError(f"--router-std {opts.router_std}: give a finite value >= 0")
    try:
        check_new_dir(out, "upcycling")
    except CheckpointError as err:
        raise UpcycleError(f"--out: {err}") from None


class Upcycler:
    """Expert copies and new routers from one seeded random stream, so the result depends only on
    the options, never on how the model is sharded or in which order layers are written."""

    def __init__(self, opts: Options, default_router_std: float):
        self.opts = opts
        self.router_std = default_router_std if opts.router_std is None else opts.router_std
        self.generator = torch.Generator().manual_seed(opts.seed)

    def expert_copies(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """``num_experts`` copies of ``weight``; with ``--noise S``, each plus ``S * std(W) * N(0, 1)``."""
        if self.opts.noise == 0:
            return [weight.clone() for _ in range(self.opts.num_experts)]
        scale = self.opts.noise * weight.float().std()
        return [(weight.float() + scale * torch.randn(weight.shape, generator=self.generator)).to(weight.dtype)
                for _ in range(self.opts.num_experts)]

    def router(self, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
        """A router weight ``[E, hidden]``: zeros (every expert scores equal) or N(0, router_std)."""
        router = torch.zeros(self.opts.num_experts, hidden_size)
        if self.opts.router_init == "normal":
            router = torch.randn(router.shape, generator=self.generator) * self.router_std
        return router.to(dtype)

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.opts.dtype == "auto" or not tensor.is_floating_point():
            return tensor.contiguous()
        return tensor.to(DTYPES[self.opts.dtype]).contiguous()
