"""The noise-free topography measures, the gate's recorded scores, and the paper's lambda units."""

import math

import pytest
import torch
import torch.nn.functional as F

from moge_ds.analysis.topography import MapGeometry, border_bias, map_smoothness, top_k_load, topography
from moge_ds.config import Config, ConfigError, apply_overrides, resolve_gs_lambda, tokens_per_sample
from moge_ds.gate import MoGEGate
from moge_ds.topographic import map_neighbours, paper_lambda_to_gs_weight, pooling_matrix, top2_neighbour_rate


def test_map_neighbours_hand_counted():
    flat = map_neighbours((3, 3))
    assert flat[4].sum() == 8 and flat[0].sum() == 3 and flat[1].sum() == 5  # centre, corner, edge
    assert not flat.diagonal().any() and torch.equal(flat, flat.t())
    torus = map_neighbours((4, 4), circular=True)
    assert (torus.sum(1) == 8).all() and torus[0, 3] and torus[0, 15] and not torus[0, 10]


def test_top2_neighbour_rate_and_chance():
    neighbours = map_neighbours((3, 3))
    scores = torch.zeros(4, 9)
    scores[0, [4, 0]] = torch.tensor([0.6, 0.3])  # centre and corner touch
    scores[1, [0, 8]] = torch.tensor([0.6, 0.3])  # opposite corners do not
    scores[2, [1, 2]] = torch.tensor([0.5, 0.4])
    scores[3, [2, 6]] = torch.tensor([0.5, 0.4])
    rate, chance = top2_neighbour_rate(scores, neighbours)
    assert rate == 0.5
    # 3x3 map: 4 corners x 3 + 4 edges x 5 + centre x 8 = 40 ordered neighbour pairs of 72.
    assert chance == pytest.approx(40 / 72)


def test_smoothness_sees_neighbours_that_score_alike():
    torch.manual_seed(0)
    rows, cols = 4, 4
    # Each token activates a random 2x2 block of experts: neighbours co-activate.
    scores = torch.zeros(2000, rows * cols)
    r, c = torch.randint(0, rows - 1, (2000,)), torch.randint(0, cols - 1, (2000,))
    for dr in (0, 1):
        for dc in (0, 1):
            scores[torch.arange(2000), (r + dr) * cols + c + dc] = 0.25
    neighbours = map_neighbours((rows, cols))
    assert map_smoothness(scores, neighbours) > 0.2
    shuffled = scores[:, torch.randperm(rows * cols, generator=torch.Generator().manual_seed(3))]
    assert map_smoothness(shuffled, neighbours) < map_smoothness(scores, neighbours) - 0.1
    assert abs(map_smoothness(torch.rand(2000, 16), neighbours)) < 0.02


def test_border_bias_sign_and_circular_nan():
    pooling = pooling_matrix((4, 4), 3, 1.0, 1, "valid")
    coverage = (pooling > 0).sum(1).double()
    assert border_bias(coverage.max() - coverage + 1, pooling) == pytest.approx(-1.0)  # load where coverage is low
    assert border_bias(coverage, pooling) == pytest.approx(1.0)
    assert math.isnan(border_bias(torch.rand(16), pooling_matrix((4, 4), 3, 1.0, 1, "circular")))


def test_topography_of_uniform_and_peaked_routers():
    geometry = MapGeometry((4, 4), padding="valid")
    uniform = torch.full((10, 16), 1 / 16)
    result = topography(uniform, geometry, k=1)
    assert result["entropy_normalized"] == pytest.approx(1.0)
    assert result["group_sparsity_loss"] == pytest.approx(result["group_sparsity_loss_uniform"])
    peaked = F.one_hot(torch.arange(10) % 16, 16).double()
    assert topography(peaked, geometry, k=1)["entropy_normalized"] == pytest.approx(0.0, abs=1e-6)
    assert top_k_load(peaked, 1).sum() == pytest.approx(1.0)


def test_topography_scores_both_graphs_whatever_the_padding():
    """Top-2 always experts 0 and 3 of a 3x4 map: neighbours across the wrap only, so the torus
    sees a perfect map and the flat grid none, under either padding's geometry."""
    scores = torch.full((5, 12), 0.01)
    scores[:, 0], scores[:, 3] = 0.5, 0.4
    for padding in ("valid", "circular"):
        measures = topography(scores, MapGeometry((3, 4), 3, 1, padding, 1.0), 2)
        assert measures["top2_neighbour_rate_torus"] == 1.0 and measures["top2_neighbour_rate_flat"] == 0.0
        assert measures["top2_neighbour_chance_torus"] > measures["top2_neighbour_chance_flat"]
    assert measures["top2_neighbour_rate"] == measures["top2_neighbour_rate_torus"]  # circular: its own map


@pytest.mark.parametrize("policy", [None, "Jitter", "RSample"])
@pytest.mark.parametrize("gs_weight", [0.0, 1.0])
def test_gate_keeps_noise_free_scores(policy, gs_weight):
    torch.manual_seed(0)
    gate = MoGEGate(12, 16, 2, capacity_factor=2.0, min_capacity=2, noisy_gate_policy=policy, gs_weight=gs_weight)
    x = torch.randn(40, 12)
    gate(x)
    want = F.softmax(x @ gate.wg.weight.t(), dim=-1)
    torch.testing.assert_close(gate.last_scores, want, rtol=1e-6, atol=1e-7)
    assert not gate.last_scores.requires_grad


def _router_grad(weight: torch.Tensor, x: torch.Tensor, **gate_kwargs) -> torch.Tensor:
    """d(aux_loss_weight * l_aux)/d(router weight), the trainer's aux term, at aux_loss_weight 0.01."""
    gate = MoGEGate(x.shape[1], 16, 1, capacity_factor=4.0, min_capacity=2, sigma=1.0, **gate_kwargs)
    with torch.no_grad():
        gate.wg.weight.copy_(weight)
    (0.01 * gate(x)[0]).backward()
    return gate.wg.weight.grad


def test_paper_lambda_gives_the_paper_gradient():
    """lambda * sum_t sum_p g / P (the paper), in float64 by hand, vs both of our units."""
    torch.manual_seed(0)
    x, weight = torch.randn(64, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    paper_lambda, tokens = 3e-3, 64
    w = weight.clone().requires_grad_(True)
    groups = torch.sqrt(F.softmax(x @ w.t(), -1).square() @ pooling_matrix((4, 4), 3, 1.0, dtype=torch.float64)
                        + 1e-8)
    (paper_lambda * groups.sum() / groups.shape[1]).backward()
    load_balance_only = _router_grad(weight.float(), x.float(), gs_weight=0.0)
    for reduction in ("mean", "sum"):
        gs_weight = paper_lambda_to_gs_weight(paper_lambda, 0.01, tokens, reduction)
        got = _router_grad(weight.float(), x.float(), gs_weight=gs_weight, reduction=reduction) - load_balance_only
        torch.testing.assert_close(got.double(), w.grad, rtol=1e-3, atol=1e-8)


def test_config_gs_lambda_resolves_with_tokens_per_layer():
    vit = apply_overrides(Config(), ("model.kind=vit", "model.patch_size=7", "moe.gs_lambda=3e-3"))
    assert tokens_per_sample(vit.model) == 17
    resolve_gs_lambda(vit, micro_batch=32)
    assert vit.moe.gs_weight == pytest.approx(0.003 * 32 * 17 / 0.01)  # 163.2, as the issue computes
    resolve_gs_lambda(vit, micro_batch=32)  # a saved config (lambda + resolved weight) passes again
    lm = apply_overrides(Config(), ("model.seq_length=64", "moe.gs_lambda=1e-5", "moe.gs_weight=3"))
    with pytest.raises(ConfigError, match="both set"):
        resolve_gs_lambda(lm, micro_batch=32)
    zero_aux = apply_overrides(Config(), ("moe.gs_lambda=1e-5", "moe.aux_loss_weight=0"))
    with pytest.raises(ConfigError, match="aux_loss_weight > 0"):
        resolve_gs_lambda(zero_aux, micro_batch=32)
