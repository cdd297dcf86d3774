"""Gate and layer micro-benchmarks: MoGEGate vs DeepSpeed's TopKGate, side by side in one process.

    python -m bench.bench_gate [--quick] [--out bench/results]

1. Gate fwd+bwd, MoGE vs TopKGate, for E x T x k, hidden 512 (``sparse_routes=True``, as MOELayer
   calls it). The two gates share weights and run interleaved, so machine drift hits both alike.
2. The regulariser alone (softmax + pooling + sqrt + sum, fwd+bwd), and the same in the naive
   reference form (``conv2d`` on ``[T, 1, r, c]``), against a full MoE layer (gate + experts,
   FFN 4x hidden) fwd+bwd at the same T.
3. How the gate overhead grows with E at fixed hidden size, and with hidden size at fixed E.

Timings: medians over calls that alternate between the variants after warm-up; CUDA events on a
GPU, ``perf_counter`` on CPU.
Writes ``<out>/gate.json`` and ``<out>/gate.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate

from bench.environment import describe_machine
from moge_ds.gate import MoGEGate
from moge_ds.layer import MoGE
from moge_ds.topographic import default_map_shape, gaussian_kernel, pooled_group_sparsity, pooling_matrix

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seconds(fn) -> float:
    """Wall time of one call of ``fn``: CUDA events on a GPU, ``perf_counter`` on CPU."""
    if DEVICE.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, callable], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, calls alternating A, B, C, A, B, C, ... after warm-up,
    so that a slow patch of the machine hits every function alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(seconds(fn))
    return {name: statistics.median(v) for name, v in samples.items()}


def gate_step(gate, x):

    def run():
        x.grad = None
        gate.wg.weight.grad = None
        out = gate(x, None, True)
        (out[0] + out[5].sum()).backward()  # l_aux and the combine weights both reach the router

    return run


def naive_regulariser(logits: torch.Tensor, map_shape, sigma: float) -> torch.Tensor:
    """The reference form: recompute the softmax, lay out as images, conv2d with the kernel."""
    z = torch.softmax(logits, -1).square().view(-1, 1, *map_shape)
    kernel = gaussian_kernel(3, sigma).to(logits.device).view(1, 1, 3, 3)
    groups = torch.sqrt(F.conv2d(z, kernel) + 1e-8)
    return groups.sum() / groups[0].numel()


def bench_gates(experts: list[int], tokens: list[int], ks: list[int], hidden: int, reps: int) -> list[dict]:
    rows = []
    for num_experts in experts:
        map_shape = default_map_shape(num_experts)
        padding = "valid" if min(map_shape) >= 3 else "circular"
        for t in tokens:
            for k in ks:
                torch.manual_seed(0)
                x = torch.randn(t, hidden, device=DEVICE, requires_grad=True)
                vanilla = TopKGate(hidden, num_experts, k, capacity_factor=1.0, min_capacity=4).to(DEVICE)
                moge = MoGEGate(hidden, num_experts, k, capacity_factor=1.0, min_capacity=4, gs_weight=1.0,
                                padding=padding, reduction="mean").to(DEVICE)
                moge.wg.load_state_dict(vanilla.wg.state_dict())
                logits = torch.randn(t, num_experts, device=DEVICE, requires_grad=True)
                pooling = pooling_matrix(map_shape, 3, 1.0, padding=padding, device=DEVICE)

                def regulariser():
                    logits.grad = None
                    pooled_group_sparsity(torch.softmax(logits, -1), pooling, "mean").backward()

                times = interleaved({"topk": gate_step(vanilla, x), "moge": gate_step(moge, x),
                                     "regulariser": regulariser}, reps)
                rows.append({"E": num_experts, "T": t, "k": k, "hidden": hidden, "padding": padding, **times,
                             "ratio": times["moge"] / times["topk"],
                             "overhead_ms": (times["moge"] - times["topk"]) * 1e3})
                print(f"gate E={num_experts:4d} T={t:6d} k={k}: TopKGate {times['topk'] * 1e3:8.2f} ms, "
                      f"MoGE {times['moge'] * 1e3:8.2f} ms, ratio {rows[-1]['ratio']:.3f}, "
                      f"regulariser alone {times['regulariser'] * 1e3:.2f} ms", flush=True)
    return rows


def bench_layer(experts: list[int], t: int, k: int, hidden: int, reps: int) -> list[dict]:
    """The regulariser (ours and the naive form) as a share of a whole MoE layer's fwd+bwd."""
    rows = []
    for num_experts in experts:
        map_shape = default_map_shape(num_experts)
        torch.manual_seed(0)
        expert = torch.nn.Sequential(torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(),
                                     torch.nn.Linear(4 * hidden, hidden))
        layer = MoGE(hidden, expert, num_experts=num_experts, k=k, capacity_factor=1.0, gs_weight=0.0).to(DEVICE)
        x = torch.randn(1, t, hidden, device=DEVICE, requires_grad=True)
        logits = torch.randn(t, num_experts, device=DEVICE, requires_grad=True)
        pooling = pooling_matrix(map_shape, 3, 1.0, device=DEVICE)

        def layer_step():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            out, l_aux, _ = layer(x)
            (out.square().mean() + l_aux).backward()

        def ours():
            logits.grad = None
            pooled_group_sparsity(torch.softmax(logits, -1), pooling, "mean").backward()

        def naive():
            logits.grad = None
            naive_regulariser(logits, map_shape, 1.0).backward()

        times = interleaved({"layer": layer_step, "regulariser": ours, "naive_regulariser": naive}, reps, warmup=1)
        row = {"E": num_experts, "T": t, "k": k, "hidden": hidden, **times,
               "regulariser_share": times["regulariser"] / times["layer"],
               "naive_share": times["naive_regulariser"] / times["layer"]}
        rows.append(row)
        print(f"layer E={num_experts:4d} T={t}: layer {times['layer'] * 1e3:.0f} ms, regulariser "
              f"{times['regulariser'] * 1e3:.2f} ms ({row['regulariser_share']:.2%}), naive "
              f"{times['naive_regulariser'] * 1e3:.2f} ms ({row['naive_share']:.2%})", flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Gate benchmark ({m['device']}, torch {m['torch']}, DeepSpeed {m['deepspeed']}, "
             f"{m['threads']} threads)", "", f"Command: `{result['command']}`", "",
             "## Gate fwd+bwd: MoGEGate vs TopKGate (same weights, interleaved)", "",
             "| E | T | k | TopKGate ms | MoGEGate ms | ratio | overhead ms | regulariser alone ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["gates"]:
        lines.append(f"| {r['E']} | {r['T']} | {r['k']} | {r['topk'] * 1e3:.2f} | {r['moge'] * 1e3:.2f} | "
                     f"{r['ratio']:.3f} | {r['overhead_ms']:.2f} | {r['regulariser'] * 1e3:.2f} |")
    lines += ["", "## Regulariser vs a whole MoE layer (gate + experts, FFN 4x hidden), fwd+bwd", "",
              "| E | T | k | layer ms | regulariser ms | share | naive conv2d form ms | naive share |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["layers"]:
        lines.append(f"| {r['E']} | {r['T']} | {r['k']} | {r['layer'] * 1e3:.0f} | {r['regulariser'] * 1e3:.2f} | "
                     f"{r['regulariser_share']:.2%} | {r['naive_regulariser'] * 1e3:.2f} | {r['naive_share']:.2%} |")
    if result.get("hidden_scaling"):
        lines += ["", "## Gate overhead at fixed E as the hidden size grows", "",
                  "| hidden | E | T | k | TopKGate ms | MoGEGate ms | overhead ms | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["hidden_scaling"]:
            lines.append(f"| {r['hidden']} | {r['E']} | {r['T']} | {r['k']} | {r['topk'] * 1e3:.2f} | "
                         f"{r['moge'] * 1e3:.2f} | {r['overhead_ms']:.2f} | {r['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small grid, for a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    if args.quick:
        experts, tokens, ks, layer_experts, layer_t, hidden_sizes = [16, 64], [1024], [1, 2], [64], 2048, [256, 512]
    else:
        experts, tokens, ks = [8, 16, 32, 64, 128, 256], [1024, 8192, 32768], [1, 2]
        layer_experts, layer_t, hidden_sizes = [64, 256], 32768, [256, 512, 1024, 2048]
    command = "python -m bench.bench_gate" + (" --quick" if args.quick else "")
    result = {"machine": describe_machine(), "command": command,
              "gates": bench_gates(experts, tokens, ks, 512, args.reps),
              "layers": bench_layer(layer_experts, layer_t, 2, 512, 3),
              "hidden_scaling": [r for h in hidden_sizes for r in bench_gates([64], [8192], [2], h, args.reps)]}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gate_quick" if args.quick else "gate"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}.md").write_text(markdown(result))
    print(f"wrote {args.out / name}.md")


if __name__ == "__main__":
    main()
