"""MoGEGate against DeepSpeed's own TopKGate, and the regulariser's effect on routing."""

import pytest
import torch
from deepspeed.moe.sharded_moe import TopKGate

from moge_ds.gate import MoGEGate, set_sigma_step
from moge_ds.layer import MoGE
from moge_ds.topographic import SigmaSchedule, group_sparsity_loss

GATE_KW = dict(capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=2)


def paired_gates(k, num_experts=16, model_dim=12, **kwargs):
    torch.manual_seed(0)
    vanilla = TopKGate(model_dim, num_experts, k, **GATE_KW, **kwargs)
    moge = MoGEGate(model_dim, num_experts, k, **GATE_KW, **kwargs)
    moge.wg.load_state_dict(vanilla.wg.state_dict())
    return vanilla, moge


def run(gate, x, seed, sparse_routes):
    torch.manual_seed(seed)  # RTS and Gumbel sampling draw from the global RNG
    return gate(x, None, sparse_routes)


def assert_same_outputs(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v)
        else:
            assert u == v


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("sparse_routes", [True, False])
@pytest.mark.parametrize("noisy_gate_policy", [None, "Jitter", "RSample"])
def test_zero_weight_equals_topkgate(k, drop_tokens, sparse_routes, noisy_gate_policy):
    vanilla, moge = paired_gates(k, drop_tokens=drop_tokens, noisy_gate_policy=noisy_gate_policy)
    x = torch.randn(40, 12)
    assert_same_outputs(run(vanilla, x, 1, sparse_routes), run(moge, x, 1, sparse_routes))
    vanilla.eval(), moge.eval()
    assert_same_outputs(run(vanilla, x, 2, sparse_routes), run(moge, x, 2, sparse_routes))


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("noisy_gate_policy", [None, "Jitter", "RSample"])
def test_regulariser_adds_to_l_aux_and_keeps_routing(k, noisy_gate_policy):
    vanilla, _ = paired_gates(k, noisy_gate_policy=noisy_gate_policy)
    moge = MoGEGate(12, 16, k, **GATE_KW, noisy_gate_policy=noisy_gate_policy, gs_weight=0.25, sigma=1.5,
                    reduction="mean")
    moge.wg.load_state_dict(vanilla.wg.state_dict())
    x = torch.randn(40, 12)
    want, got = run(vanilla, x, 3, True), run(moge, x, 3, True)
    assert_same_outputs(want[1:], got[1:])
    # Noise-free scores, whatever noise the routing used.
    scores = torch.softmax(x.double() @ vanilla.wg.weight.double().t(), dim=-1)
    gs = group_sparsity_loss(scores, (4, 4), 3, 1.5, reduction="mean")
    assert got[0].item() == pytest.approx(want[0].item() + 0.25 * gs.item(), rel=1e-5)
    assert moge.last_group_sparsity_loss.item() == pytest.approx(gs.item(), rel=1e-5)
    assert moge.last_load_balance_loss.item() == pytest.approx(want[0].item(), rel=1e-6)


def test_gradient_reaches_router_and_input():
    gate = MoGEGate(12, 16, 2, **GATE_KW, gs_weight=1.0)
    x = torch.randn(40, 12, requires_grad=True)
    gate(x, None, True)[0].backward()
    assert gate.wg.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_sigma_schedule_steps_and_pooling_cache():
    layer = MoGE(8, torch.nn.Linear(8, 8), num_experts=16, gs_weight=1.0, sigma=SigmaSchedule(total_steps=10))
    assert layer.gate.sigma == 10.0
    first = layer.gate.pooling(torch.device("cpu"))
    assert layer.gate.pooling(torch.device("cpu")) is first
    set_sigma_step(layer, 10)
    assert layer.gate.sigma == 1.0
    assert not torch.equal(layer.gate.pooling(torch.device("cpu")), first)


def neighbour_fraction(top2, cols):
    """How often a token's two top experts touch on the map (8-neighbourhood)."""
    r, c = top2 // cols, top2 % cols
    return ((r[:, 0] - r[:, 1]).abs().le(1) & (c[:, 0] - c[:, 1]).abs().le(1)).float().mean().item()


def neighbour_correlation(scores, rows, cols):
    """Mean correlation over tokens of neighbouring experts' scores, minus that of the other pairs."""
    corr = torch.corrcoef(scores.t())
    e = torch.arange(rows * cols)
    r, c = e // cols, e % cols
    self_pair = torch.eye(len(e), dtype=torch.bool)
    near = (r[:, None] - r).abs().le(1) & (c[:, None] - c).abs().le(1) & ~self_pair
    return (corr[near].mean() - corr[~near & ~self_pair].mean()).item()


def train_router(gs_weight, steps=300):
    """A router on fixed tokens, pushed to confident top-2 routing (standing in for a task) plus l_aux."""
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    gate = MoGEGate(32, 16, 2, capacity_factor=4.0, min_capacity=2, gs_weight=gs_weight, sigma=1.0,
                    reduction="mean", top2_2nd_expert_sampling=False)
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        l_aux = gate(x, None, True)[0]
        confidence = torch.softmax(gate.wg(x), -1).topk(2).values.sum(-1).mean()
        (l_aux - confidence).backward()
        opt.step()
    with torch.no_grad():
        scores = torch.softmax(gate.wg(x), -1)
    return (group_sparsity_loss(scores, (4, 4), reduction="mean").item(),
            neighbour_fraction(scores.topk(2).indices, 4), neighbour_correlation(scores, 4, 4))


def test_regulariser_groups_neighbouring_experts():
    gs_plain, neighbours_plain, corr_plain = train_router(0.0)
    gs_moge, neighbours_moge, corr_moge = train_router(10.0)
    assert gs_moge < 0.7 * gs_plain, (gs_plain, gs_moge)
    assert neighbours_moge > neighbours_plain + 0.2, (neighbours_plain, neighbours_moge)
    assert corr_moge > corr_plain + 0.15, (corr_plain, corr_moge)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=12, ep_size=5), r"num_experts \(12\) must be a positive multiple of ep_size \(5\)"),
    (dict(num_experts=16, k=17), r"k must be in \[1, num_experts=16\], got 17"),
    (dict(num_experts=16, map_shape=(2, 4)), r"map_shape \(2, 4\) does not fit 16 experts"),
    (dict(num_experts=16, noisy_gate_policy="gauss"), r"noisy_gate_policy must be .* got 'gauss'"),
    (dict(num_experts=16, gs_weight=-1.0), r"gs_weight must be >= 0, got -1.0"),
])
def test_layer_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoGE(8, torch.nn.Linear(8, 8), **kwargs)
