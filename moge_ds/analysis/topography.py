"""Does a router have topographic order? Measures on the noise-free scores ``[T, E]``.

Routed experts are a poor probe: DeepSpeed's top-2 gate samples the 2nd expert (in eval too, by
default) and top-1 has no pair at all. Everything here reads the noise-free softmax scores, the
quantity the MoGE penalty shapes, and sets each measure next to what no order would give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moge_ds.analysis.metrics import routing_entropy
from moge_ds.topographic import map_neighbours, pooled_group_sparsity, pooling_matrix, top2_neighbour_rate


@dataclass(frozen=True)
class MapGeometry:
    """Where the experts sit and how the penalty groups them (the run's ``moe`` settings)."""

    map_shape: tuple[int, int]
    window_size: int = 3
    stride: int = 1
    padding: str = "valid"
    sigma: float = 1.0  # the kernel width the penalty ends with (sigma_min)

    def neighbours(self) -> torch.Tensor:
        """``[E, E]`` bool, on the torus under circular padding."""
        return map_neighbours(self.map_shape, self.padding == "circular")

    def pooling(self) -> torch.Tensor:
        """``[E, P]`` float64 pooling matrix of the penalty's groups."""
        return pooling_matrix(self.map_shape, self.window_size, self.sigma, self.stride, self.padding, torch.float64)


def map_smoothness(scores: torch.Tensor, neighbours: torch.Tensor) -> float:
    """Mean correlation of the score columns of neighbouring experts minus that of non-neighbours.

    0 when the map placement is irrelevant to what experts score; > 0 when neighbours score alike.
    """
    columns = scores.double().t()
    corr = torch.nan_to_num(torch.corrcoef(columns))  # a constant column correlates with nothing
    others = ~neighbours & ~torch.eye(len(corr), dtype=torch.bool)
    if not neighbours.any() or not others.any():
        return math.nan
    return (corr[neighbours].mean() - corr[others].mean()).item()


def top_k_load(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[E]`` share of the noise-free top-k choices each expert gets."""
    counts = torch.bincount(scores.topk(k, dim=-1).indices.flatten(), minlength=scores.shape[1]).double()
    return counts / counts.sum()


def border_bias(load: torch.Tensor, pooling: torch.Tensor) -> float:
    """Correlation of expert load with how many of the penalty's windows cover the expert.

    Under valid padding edge experts sit in fewer windows; a negative value means load moved
    toward the border. NaN when every expert has the same coverage (circular padding).
    """
    coverage = (pooling > 0).sum(1).double()
    if coverage.std() == 0 or load.std() == 0:
        return math.nan
    return torch.corrcoef(torch.stack([load.double(), coverage]))[0, 1].item()


def topography(scores: torch.Tensor, geometry: MapGeometry, k: int) -> dict[str, float]:
    """All measures for one layer's noise-free ``scores`` ``[T, E]``; see the functions above."""
    scores = scores.double()
    num_experts = scores.shape[1]
    neighbours, pooling = geometry.neighbours(), geometry.pooling()
    rate, chance = top2_neighbour_rate(scores, neighbours)
    # Both graphs for every run, so MoE (scored on the flat grid by default) and circular MoGE (on
    # the torus) can be compared like for like.
    torus, torus_chance = top2_neighbour_rate(scores, map_neighbours(geometry.map_shape, True))
    flat, flat_chance = top2_neighbour_rate(scores, map_neighbours(geometry.map_shape, False))
    uniform = torch.full_like(scores[:1], 1.0 / num_experts)
    return {"top2_neighbour_rate": rate, "top2_neighbour_chance": chance,
            "top2_neighbour_rate_torus": torus, "top2_neighbour_chance_torus": torus_chance,
            "top2_neighbour_rate_flat": flat, "top2_neighbour_chance_flat": flat_chance,
            "map_smoothness": map_smoothness(scores, neighbours),
            "border_bias": border_bias(top_k_load(scores, k), pooling),
            "entropy_normalized": (routing_entropy(scores).mean() / math.log(num_experts)).item(),
            "group_sparsity_loss": pooled_group_sparsity(scores, pooling, "mean").item(),
            "group_sparsity_loss_uniform": pooled_group_sparsity(uniform, pooling, "mean").item()}
