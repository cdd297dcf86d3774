"""Independent references the tests compare against (no code shared with moge_ds)."""

import math


def reference_loss(scores, map_shape, window, sigma, stride, padding, reduction):
    """Written from the paper's steps with plain Python loops, float64, no shared code."""
    rows, cols = map_shape
    half = window // 2
    kernel = [[math.exp(-((i - half)**2 + (j - half)**2) / (2 * sigma**2)) for j in range(window)]
              for i in range(window)]
    norm = sum(map(sum, kernel))
    span_r = rows if padding == "circular" else rows - window + 1
    span_c = cols if padding == "circular" else cols - window + 1
    origins = [(i, j) for i in range(0, span_r, stride) for j in range(0, span_c, stride)]
    total = 0.0
    for token in scores.tolist():
        grid = [[token[r * cols + c] for c in range(cols)] for r in range(rows)]
        for i0, j0 in origins:
            energy = sum(kernel[a][b] / norm * grid[(i0 + a) % rows][(j0 + b) % cols]**2
                         for a in range(window) for b in range(window))
            total += math.sqrt(energy + 1e-8)
    total /= len(origins)
    return total / len(scores) if reduction == "mean" else total
