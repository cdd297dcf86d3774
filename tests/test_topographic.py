"""The group-sparsity maths against an independent float64 loop over groups."""

import math

import pytest
import torch
from tests.reference import reference_loss

from moge_ds.topographic import (SigmaSchedule, default_map_shape, gaussian_kernel, group_sparsity_loss,
                                 pooling_matrix)


def test_default_map_shape():
    assert default_map_shape(16) == (4, 4)
    assert default_map_shape(32) == (4, 8)
    assert default_map_shape(64) == (8, 8)
    assert default_map_shape(128) == (8, 16)
    assert default_map_shape(13) == (1, 13)
    assert default_map_shape(1) == (1, 1)


def test_gaussian_kernel_hand_values():
    k = gaussian_kernel(3, 1.0, torch.float64)
    e1, e2 = math.exp(-0.5), math.exp(-1.0)
    z = 1 + 4 * e1 + 4 * e2
    assert k[1, 1].item() == pytest.approx(1 / z)
    assert k[0, 1].item() == pytest.approx(e1 / z)
    assert k[0, 0].item() == pytest.approx(e2 / z)
    assert k.sum().item() == pytest.approx(1.0)
    # A very wide Gaussian is nearly uniform: plain group lasso.
    assert torch.allclose(gaussian_kernel(3, 1e4, torch.float64), torch.full((3, 3), 1 / 9, dtype=torch.float64))


def test_hand_made_case():
    # One token, all mass on one expert of a 3x3 map, window 3: one group holding that expert.
    scores = torch.zeros(1, 9, dtype=torch.float64)
    scores[0, 4] = 1.0
    centre = gaussian_kernel(3, 1.0, torch.float64)[1, 1].item()
    assert group_sparsity_loss(scores, (3, 3)).item() == pytest.approx(math.sqrt(centre + 1e-8))
    scores = torch.zeros(1, 9, dtype=torch.float64)
    scores[0, 0] = 1.0
    corner = gaussian_kernel(3, 1.0, torch.float64)[0, 0].item()
    assert group_sparsity_loss(scores, (3, 3)).item() == pytest.approx(math.sqrt(corner + 1e-8))


# Every E x window x padding combination whose default map holds the window (a 5x5 window
# fits no factorisation of 16 or 32 without padding).
LOOP_CASES = [(e, w, p) for e in (16, 32, 64, 128) for w in (3, 5) for p in ("valid", "circular")
              if p == "circular" or w <= min(default_map_shape(e))]


@pytest.mark.parametrize("num_experts, window, padding", LOOP_CASES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_float64_loop(num_experts, window, padding, reduction):
    map_shape = default_map_shape(num_experts)
    gen = torch.Generator().manual_seed(num_experts + window)
    scores = torch.softmax(3 * torch.randn(7, num_experts, generator=gen, dtype=torch.float64), dim=-1)
    for stride in (1, 2):
        sigma = 0.7 + stride
        got = group_sparsity_loss(scores, map_shape, window, sigma, stride, padding, reduction)
        want = reference_loss(scores, map_shape, window, sigma, stride, padding, reduction)
        assert got.item() == pytest.approx(want, rel=1e-12)


def test_float32_close_to_float64():
    scores = torch.softmax(torch.randn(64, 32, dtype=torch.float64), dim=-1)
    want = group_sparsity_loss(scores, (4, 8), reduction="mean")
    got = group_sparsity_loss(scores.float(), (4, 8), reduction="mean")
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("padding", ["valid", "circular"])
def test_gradcheck(padding):
    logits = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)

    def loss(x):
        return group_sparsity_loss(torch.softmax(x, -1), (4, 4), 3, 1.3, 1, padding, "mean")

    assert torch.autograd.gradcheck(loss, (logits, ))


def test_pooling_matrix_columns_are_kernels():
    w = pooling_matrix((4, 4), 3, 1.0, dtype=torch.float64)
    assert w.shape == (16, 4)
    assert torch.allclose(w.sum(0), torch.ones(4, dtype=torch.float64))
    w = pooling_matrix((4, 4), 3, 1.0, padding="circular", dtype=torch.float64)
    assert w.shape == (16, 16)
    # On a torus every expert sits in the same number of windows with the same total weight.
    assert torch.allclose(w.sum(1), torch.ones(16, dtype=torch.float64))


@pytest.mark.parametrize("kwargs, message", [
    (dict(map_shape=(3, 5)), r"map_shape \(3, 5\) does not fit 16 experts"),
    (dict(map_shape=(4, 4), window_size=5), r"window_size 5 is larger than the map \(4, 4\)"),
    (dict(map_shape=(4, 4), window_size=2), r"window_size must be a positive odd integer, got 2"),
    (dict(map_shape=(4, 4), sigma=0.0), r"sigma must be > 0, got 0.0"),
    (dict(map_shape=(4, 4), padding="same"), r"padding must be 'valid' or 'circular', got 'same'"),
    (dict(map_shape=(4, 4), reduction="max"), r"reduction must be 'sum' or 'mean', got 'max'"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_sparsity_loss(torch.rand(2, 16), **kwargs)


def test_sigma_schedule():
    s = SigmaSchedule(total_steps=100)
    assert s.value(0) == 10.0
    assert s.value(100) == 1.0
    assert s.value(1000) == 1.0
    assert s.value(50) == pytest.approx(10 - 9 * 0.5**0.2)
    values = [s.value(t) for t in range(0, 101, 10)]
    assert values == sorted(values, reverse=True)
    restored = SigmaSchedule(total_steps=1)
    restored.load_state_dict(s.state_dict())
    assert restored == s
    with pytest.raises(ValueError, match="sigma_min=5"):
        SigmaSchedule(total_steps=10, sigma_max=1, sigma_min=5)
