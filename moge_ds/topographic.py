"""The MoGE group-sparsity regulariser: pure torch, no DeepSpeed.

A router's softmax scores over E experts are laid out row-major on an ``(r, c)``
topographic map (expert ``e`` sits at ``(e // c, e % c)``). Overlapping ``h x h``
Gaussian-weighted windows of the squared scores are the groups; the loss is the
sum of the groups' L2 norms, divided by the number of groups P.

Pooling a window is linear in ``z**2``, so the whole convolution is one
``[T, E] @ [E, P]`` matmul with a fixed pooling matrix. That is the form used
here: it handles stride and circular padding with no special cases and needs no
reshape of the token batch into images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Padding = Literal["valid", "circular"]
Reduction = Literal["sum", "mean"]

_GROUP_NORM_EPS = 1e-8


def default_map_shape(num_experts: int) -> tuple[int, int]:
    """The most square factorisation ``(r, c)`` of ``num_experts`` with ``r <= c``.

    A prime E gives ``(1, E)``.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    r = math.isqrt(num_experts)
    while num_experts % r:
        r -= 1
    return r, num_experts // r


def gaussian_kernel(window_size: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A normalised ``[h, h]`` Gaussian: ``exp(-(di^2 + dj^2) / (2 sigma^2))``, summing to 1."""
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    offsets = torch.arange(window_size, dtype=torch.float64) - window_size // 2
    one_d = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = torch.outer(one_d, one_d)
    return (kernel / kernel.sum()).to(dtype)


def check_map(num_experts: int, map_shape: tuple[int, int], window_size: int, stride: int, padding: str) -> None:
    """Raise ``ValueError`` naming the bad value if the map cannot hold the groups."""
    if len(map_shape) != 2 or map_shape[0] * map_shape[1] != num_experts:
        raise ValueError(f"map_shape {tuple(map_shape)} does not fit {num_experts} experts: "
                         f"its product must equal num_experts (default: {default_map_shape(num_experts)})")
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if padding not in ("valid", "circular"):
        raise ValueError(f"padding must be 'valid' or 'circular', got {padding!r}")
    if padding == "valid" and window_size > min(map_shape):
        raise ValueError(f"window_size {window_size} is larger than the map {tuple(map_shape)} under valid "
                         f"padding: use a window <= {min(map_shape)}, padding='circular', or another map shape")


def _group_origins(size: int, window_size: int, stride: int, padding: str) -> torch.Tensor:
    """Top-left coordinates of the windows along one map axis."""
    span = size if padding == "circular" else size - window_size + 1
    return torch.arange(0, span, stride)


def pooling_matrix(map_shape: tuple[int, int],
                   window_size: int = 3,
                   sigma: float = 1.0,
                   stride: int = 1,
                   padding: Padding = "valid",
                   dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The ``[E, P]`` matrix W with ``(z**2 @ W)[t, p]`` = the Gaussian-pooled energy of group p.

    Column p holds the kernel weights of window p, placed on the experts it covers
    (wrapping round the torus under circular padding).
    """
    rows, cols = map_shape
    check_map(rows * cols, map_shape, window_size, stride, padding)
    kernel = gaussian_kernel(window_size, sigma, torch.float64)
    origin_r = _group_origins(rows, window_size, stride, padding)
    origin_c = _group_origins(cols, window_size, stride, padding)
    offs = torch.arange(window_size)
    # [Pr, h] and [Pc, h] expert coordinates, combined into [Pr, Pc, h, h] expert ids.
    coord_r = (origin_r[:, None] + offs[None, :]) % rows
    coord_c = (origin_c[:, None] + offs[None, :]) % cols
    expert = coord_r[:, None, :, None] * cols + coord_c[None, :, None, :]
    num_groups = len(origin_r) * len(origin_c)
    group = torch.arange(num_groups).view(len(origin_r), len(origin_c), 1, 1).expand_as(expert)
    weights = kernel.expand_as(expert)
    matrix = torch.zeros(rows * cols, num_groups, dtype=torch.float64)
    # index_put_ with accumulate: a tiny map under circular padding can cover one expert twice.
    matrix.index_put_((expert.reshape(-1), group.reshape(-1)), weights.reshape(-1), accumulate=True)
    return matrix.to(dtype=dtype, device=device)


class PoolingCache:
    """One pooling matrix kept: the gate and the Hugging Face loss need it for every MoE layer of every
    micro-batch, while sigma moves at most once a step. ``cache(...)`` takes :func:`pooling_matrix`'s
    arguments (fp32) and rebuilds only when one of them changed."""

    def __init__(self):
        self._key: tuple | None = None
        self._matrix: torch.Tensor | None = None

    def __call__(self, map_shape: tuple[int, int], window_size: int, sigma: float, stride: int, padding: Padding,
                 device: torch.device) -> torch.Tensor:
        key = (tuple(map_shape), window_size, float(sigma), stride, padding, torch.device(device))
        if key != self._key:
            self._matrix = pooling_matrix(key[0], window_size, key[2], stride, padding, torch.float32, device)
            self._key = key
        return self._matrix


def pooled_group_sparsity(scores: torch.Tensor, pooling: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """The group-sparsity loss given a precomputed ``pooling_matrix``.

    Args:
        scores: ``[T, E]`` routing scores (softmax of the noise-free logits).
        pooling: ``[E, P]`` from :func:`pooling_matrix`.
    Returns:
        A scalar: ``sum_{t,p} sqrt((scores**2 @ pooling)[t, p] + 1e-8) / P``, further divided
        by T when ``reduction == "mean"``.
    """
    groups = torch.sqrt(scores.square() @ pooling + _GROUP_NORM_EPS)
    loss = groups.sum() / pooling.shape[1]
    if reduction == "mean":
        loss = loss / scores.shape[0]
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return loss


def group_sparsity_loss(scores: torch.Tensor,
                        map_shape: tuple[int, int],
                        window_size: int = 3,
                        sigma: float = 1.0,
                        stride: int = 1,
                        padding: Padding = "valid",
                        reduction: Reduction = "mean") -> torch.Tensor:
    """MoGE's group-sparsity loss (not multiplied by lambda).

    ``reduction="sum"`` is the paper's form (summed over the T tokens, so its weight depends on
    the batch); ``"mean"`` divides by T (see :func:`paper_lambda_to_gs_weight`).

    Args:
        scores: ``[T, E]`` softmax of the noise-free router logits.
        map_shape: ``(r, c)`` with ``r * c == E``.
    Returns:
        A scalar in ``scores.dtype``; see :func:`pooled_group_sparsity`.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [tokens, experts], got shape {tuple(scores.shape)}")
    check_map(scores.shape[1], map_shape, window_size, stride, padding)
    pooling = pooling_matrix(map_shape, window_size, sigma, stride, padding, scores.dtype, scores.device)
    return pooled_group_sparsity(scores, pooling, reduction)


def paper_lambda_to_gs_weight(paper_lambda: float, aux_loss_weight: float, tokens: int,
                               reduction: Reduction) -> float:
    """The ``gs_weight`` that gives the paper's gradient for a token-summed weight ``paper_lambda``.

    The paper adds ``lambda * sum_t(...)`` over the ``tokens`` routed through a layer in one
    forward on one rank; a trainer that adds ``aux_loss_weight * gs_weight * loss(reduction)``
    matches it when ``aux_loss_weight * gs_weight = lambda * tokens`` (``"mean"``) or
    ``= lambda`` (``"sum"``).
    """
    if aux_loss_weight <= 0:
        raise ValueError(f"a paper lambda needs aux_loss_weight > 0 (it scales gs_weight), got {aux_loss_weight}")
    per_token = paper_lambda / aux_loss_weight
    return per_token * tokens if reduction == "mean" else per_token


def map_neighbours(map_shape: tuple[int, int], circular: bool = False) -> torch.Tensor:
    """``[E, E]`` bool: experts one step apart on the map (8-neighbourhood, the 3x3 window), self excluded.

    ``circular`` wraps both axes (the torus that circular padding pools over).
    """
    rows, cols = map_shape
    r = torch.arange(rows * cols) // cols
    c = torch.arange(rows * cols) % cols
    dr = (r[:, None] - r[None, :]).abs()
    dc = (c[:, None] - c[None, :]).abs()
    if circular:
        dr, dc = torch.minimum(dr, rows - dr), torch.minimum(dc, cols - dc)
    return (dr <= 1) & (dc <= 1) & ~torch.eye(rows * cols, dtype=torch.bool)


def top2_neighbour_rate(scores: torch.Tensor, neighbours: torch.Tensor) -> tuple[float, float]:
    """How often a token's two highest ``scores`` ``[T, E]`` are map neighbours, and that rate by chance.

    Chance is the share of neighbour pairs among all pairs of distinct experts: what a router
    with no topographic order gets.
    """
    top2 = scores.topk(2, dim=-1).indices
    rate = neighbours[top2[:, 0], top2[:, 1]].double().mean().item()
    e = neighbours.shape[0]
    return rate, neighbours.sum().item() / (e * (e - 1))


@dataclass
class SigmaSchedule:
    """Anneals the kernel width: ``sigma(t) = max - (max - min) * (t / total_steps) ** gamma``.

    Clamped at ``sigma_min`` from ``total_steps`` on. ``gamma < 1`` drops fast early.
    """

    total_steps: int
    sigma_max: float = 10.0
    sigma_min: float = 1.0
    gamma: float = 0.2

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"SigmaSchedule.total_steps must be >= 1, got {self.total_steps}")
        if not 0 < self.sigma_min <= self.sigma_max:
            raise ValueError(f"SigmaSchedule needs 0 < sigma_min <= sigma_max, got "
                             f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")
        if self.gamma <= 0:
            raise ValueError(f"SigmaSchedule.gamma must be > 0, got {self.gamma}")

    def value(self, step: int) -> float:
        progress = min(max(step, 0) / self.total_steps, 1.0)
        return max(self.sigma_max - (self.sigma_max - self.sigma_min) * progress**self.gamma, self.sigma_min)

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "sigma_max": self.sigma_max,
                "sigma_min": self.sigma_min, "gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        for key in ("total_steps", "sigma_max", "sigma_min", "gamma"):
            setattr(self, key, state[key])
        self.__post_init__()
