"""Pure functions over captured routing and expert weights (no model, no I/O): testable alone."""

from __future__ import annotations

import math

import torch

from moge_ds.monitor import coefficient_of_variation


def expert_load(topk: torch.Tensor, dropped: torch.Tensor, num_experts: int) -> dict[str, object]:
    """Load statistics of one layer.

    Args:
        topk: ``[T, k]`` chosen experts; dropped: ``[T, k]`` bool, routes evicted by capacity.
    Returns:
        ``fraction`` (list of E floats: share of kept routes per expert), ``cv`` (their coefficient of
        variation), ``dropped_rate`` (share of routes dropped).
    """
    kept = topk[~dropped]
    counts = torch.bincount(kept, minlength=num_experts).double()
    fraction = counts / counts.sum().clamp(min=1)
    return {"fraction": fraction.tolist(), "cv": coefficient_of_variation(fraction),
            "dropped_rate": dropped.double().mean().item()}


def routing_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Per-token entropy (nats) of ``scores`` ``[T, E]`` (rows sum to 1): ``[T]``."""
    return -(scores * scores.clamp(min=1e-12).log()).sum(-1)


def mutual_information(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """I(A; B) in bits between two ``[N]`` integer labelings, with H(A), H(B) and I / min(H(A), H(B))."""
    _, a_ids = torch.unique(a, return_inverse=True)
    _, b_ids = torch.unique(b, return_inverse=True)
    joint = torch.zeros(int(a_ids.max()) + 1, int(b_ids.max()) + 1, dtype=torch.float64)
    joint.index_put_((a_ids, b_ids), torch.ones(len(a_ids), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * (joint[nz] / (pa[:, None] * pb[None, :])[nz]).log2()).sum().item()
    ha = -(pa[pa > 0] * pa[pa > 0].log2()).sum().item()
    hb = -(pb[pb > 0] * pb[pb > 0].log2()).sum().item()
    return {"mi_bits": mi, "h_a_bits": ha, "h_b_bits": hb, "normalized": mi / max(min(ha, hb), 1e-12)}


def mean_offdiagonal_cosine(vectors: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``vectors`` ``[E, D]``: the ``[E, E]`` cosine matrix and its mean off-diagonal entry (lower = more diverse)."""
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    sim = unit @ unit.t()
    e = sim.shape[0]
    off = (sim.sum() - sim.diagonal().sum()) / (e * (e - 1)) if e > 1 else torch.tensor(math.nan)
    return off.item(), sim


def topk_jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token Jaccard index of two ``[T, k]`` expert sets: ``[T]`` (1 = same experts)."""
    same = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum(1).double()
    k = a.shape[1]
    return same / (2 * k - same)


def map_neighbour_rate(topk: torch.Tensor, map_shape: tuple[int, int]) -> float:
    """For k >= 2: how often the top-2 *routed* experts of a token touch on the map (8-neighbourhood).

    Diluted toward chance where the 2nd expert is sampled: prefer the noise-free
    ``moge_ds.analysis.topography`` measures.
    """
    if topk.shape[1] < 2:
        return math.nan
    cols = map_shape[1]
    r, c = topk[:, :2] // cols, topk[:, :2] % cols
    return ((r[:, 0] - r[:, 1]).abs().le(1) & (c[:, 0] - c[:, 1]).abs().le(1)).double().mean().item()
