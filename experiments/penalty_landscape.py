"""What does MoGE's penalty prefer? Its value for hand-made routers on the paper's 4x8 map (E=32).

    python experiments/penalty_landscape.py > results/penalty_landscape.md

Each router puts equal weight on a set of experts (a row of softmax scores). Lower is preferred.
Exact values, no training: the shape of the loss the router descends.
"""

import torch

from moge_ds.topographic import group_sparsity_loss

SHAPE = (4, 8)
ROUTERS = {  # expert ids, row-major on the 4x8 map (expert e sits at (e // 8, e % 8))
    "uniform over all 32": list(range(32)),
    "one expert, centre (9)": [9],
    "one expert, corner (0)": [0],
    "2x2 block, centre": [9, 10, 17, 18],
    "2x2 block, corner": [0, 1, 8, 9],
    "the 4 map corners (a 2x2 block on the torus)": [0, 7, 24, 31],
    "4 scattered (inner)": [9, 12, 19, 22],
    "3x3 block, centre": [1, 2, 3, 9, 10, 11, 17, 18, 19],
    "9 scattered": [0, 3, 5, 12, 14, 21, 24, 27, 31],
}


def main() -> None:
    columns = [(padding, sigma) for padding in ("valid", "circular") for sigma in (10.0, 1.0)]
    print("# The MoGE penalty on hand-made routers (E=32, 4x8 map, 3x3 window, mean reduction)\n")
    print("| router | " + " | ".join(f"{p}, sigma {s:g}" for p, s in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, experts in ROUTERS.items():
        scores = torch.zeros(1, 32, dtype=torch.float64)
        scores[0, experts] = 1.0 / len(experts)
        values = [group_sparsity_loss(scores, SHAPE, 3, sigma, 1, padding, "mean").item() for padding, sigma in columns]
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    print("\nReproduce: `python experiments/penalty_landscape.py`.")


if __name__ == "__main__":
    main()
