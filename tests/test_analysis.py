"""Analysis metrics against hand-computed values."""

import math

import pytest
import torch

from moge_ds.analysis.metrics import (expert_load, map_neighbour_rate, mean_offdiagonal_cosine, mutual_information,
                                      routing_entropy, topk_jaccard)


def test_expert_load_counts_kept_routes_only():
    topk = torch.tensor([[0, 1], [0, 2], [3, 0]])
    dropped = torch.tensor([[False, False], [False, True], [False, False]])
    stats = expert_load(topk, dropped, 4)
    assert stats["fraction"] == pytest.approx([3 / 5, 1 / 5, 0.0, 1 / 5])
    assert stats["dropped_rate"] == pytest.approx(1 / 6)
    f = torch.tensor(stats["fraction"])
    assert stats["cv"] == pytest.approx((f.std(unbiased=False) / f.mean()).item())


def test_entropy():
    scores = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert routing_entropy(scores).tolist() == pytest.approx([math.log(4), 0.0])


def test_mutual_information_extremes():
    a = torch.tensor([0, 1, 2, 3] * 25)
    same = mutual_information(a, a)
    assert same["mi_bits"] == pytest.approx(2.0) and same["normalized"] == pytest.approx(1.0)
    independent = mutual_information(torch.tensor([0, 0, 1, 1] * 25), torch.tensor([0, 1, 0, 1] * 25))
    assert independent["mi_bits"] == pytest.approx(0.0, abs=1e-12)
    # A deterministic function of A that merges classes carries H(B) bits.
    merged = mutual_information(a, a // 2)
    assert merged["mi_bits"] == pytest.approx(1.0)


def test_cosine_and_jaccard():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mean, sim = mean_offdiagonal_cosine(vectors)
    assert sim[0, 2].item() == pytest.approx(1 / math.sqrt(2))
    assert mean == pytest.approx((0 + 2 / math.sqrt(2)) * 2 / 6)
    a = torch.tensor([[0, 1], [2, 3], [4, 5]])
    b = torch.tensor([[1, 0], [2, 7], [8, 9]])
    assert topk_jaccard(a, b).tolist() == pytest.approx([1.0, 1 / 3, 0.0])


def test_map_neighbour_rate():
    topk = torch.tensor([[0, 1], [0, 5], [0, 15], [5, 10]])  # 4x4 map
    assert map_neighbour_rate(topk, (4, 4)) == pytest.approx(3 / 4)
    assert math.isnan(map_neighbour_rate(topk[:, :1], (4, 4)))
