"""Full training steps of the GPT and ViT presets, MoGE vs MoE, and 1- vs 2-rank throughput.

    python -m bench.bench_step [--quick] [--out bench/results]

Time: both models (same initial weights, differing only in gs_weight) are built in one process and
their steps interleaved in blocks, so machine drift cancels; a step is forward + backward + AdamW on
one process (ep_size 1). Peak memory: each arm runs alone in a fresh subprocess (max RSS on CPU,
``torch.cuda.max_memory_allocated`` on a GPU), alternating arms, median over repeats.
Throughput: the main job's preset through launch/train.sh with 1 and 2 ranks, tokens/s from its log.
Writes ``<out>/step.json`` and ``<out>/step.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.environment import describe_machine
from moge_ds.config import load_config
from moge_ds.gate import set_sigma_step
from moge_ds.models import build_model

REPO = Path(__file__).resolve().parents[1]

PRESETS = {"gpt": "configs/gpt_tiny.yaml", "vit": "configs/vit_fmnist.yaml"}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_arm(kind: str, num_experts: int, gs_weight: float, micro: int):
    config = load_config(str(REPO / PRESETS[kind]), (f"moe.num_experts={num_experts}", "moe.ep_size=1",
                                                      f"moe.gs_weight={gs_weight}", "moe.map_shape=null"))
    model = build_model(config, vocab_size=8000).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    if kind == "gpt":
        inputs = torch.randint(0, 8000, (micro, config.model.seq_length), generator=gen).to(DEVICE)
        targets = torch.randint(0, 8000, (micro, config.model.seq_length), generator=gen).to(DEVICE)
    else:
        inputs = torch.randn(micro, 1, 28, 28, generator=gen).to(DEVICE)
        targets = torch.randint(0, 10, (micro, ), generator=gen).to(DEVICE)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits, l_aux = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten()) + 0.01 * l_aux
        loss.backward()
        optimizer.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    set_sigma_step(model, 0)
    return step


def step_times(kind: str, num_experts: int, micro: int, blocks: int, per_block: int) -> dict:
    arms = {"moe": make_arm(kind, num_experts, 0.0, micro), "moge": make_arm(kind, num_experts, 1.0, micro)}
    for step in arms.values():
        step()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(blocks):
        for name, step in arms.items():
            t0 = time.perf_counter()
            for _ in range(per_block):
                step()
            samples[name].append((time.perf_counter() - t0) / per_block)
    moe, moge = statistics.median(samples["moe"]), statistics.median(samples["moge"])
    # Adjacent blocks of the two arms ran back to back: their ratios show how noisy the machine was.
    quartiles = statistics.quantiles([b / a for a, b in zip(samples["moe"], samples["moge"])], n=4)
    return {"kind": kind, "E": num_experts, "micro_batch": micro, "moe_s": moe, "moge_s": moge,
            "time_ratio": moge / moe,
            "block_ratio_q1": quartiles[0], "block_ratio_q3": quartiles[2]}


def peak_memory_child(kind: str, num_experts: int, gs_weight: float, micro: int) -> None:
    step = make_arm(kind, num_experts, gs_weight, micro)
    for _ in range(3):
        step()
    print(json.dumps({"peak_bytes": torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident set. Linux's VmHWM starts afresh at exec; getrusage's ru_maxrss
    does not (a child would report its parent's peak), so it is only the fallback."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(kind: str, num_experts: int, micro: int, repeats: int) -> dict:
    peaks: dict[str, list[int]] = {"moe": [], "moge": []}
    for _ in range(repeats):
        for arm, gs in (("moe", 0.0), ("moge", 1.0)):
            child = [sys.executable, "-m", "bench.bench_step", "--memory-child", kind, str(num_experts), str(gs),
                     str(micro)]
            out = subprocess.run(child, capture_output=True, text=True, check=True, cwd=REPO).stdout
            peaks[arm].append(json.loads(out.strip().splitlines()[-1])["peak_bytes"])
    moe, moge = statistics.median(peaks["moe"]), statistics.median(peaks["moge"])
    return {"moe_peak_mb": moe / 2**20, "moge_peak_mb": moge / 2**20, "memory_ratio": moge / moe}


def rank_throughput(steps: int) -> list[dict]:
    """tokens/s of the main job's preset with 1 and 2 ranks (CPU processes or GPUs), MoGE and MoE."""
    rows = []
    for nproc in (1, 2):
        for gs in (0.0, 1.0):
            with tempfile.TemporaryDirectory() as out:
                cmd = [str(REPO / "launch/train.sh"), "--nproc", str(nproc), "--master-port", str(29650 + nproc),
                       "--preset", "gpt_tiny", "--", "--set", f"moe.ep_size={nproc}", f"moe.gs_weight={gs}",
                       f"train.steps={steps}", "train.eval_interval=0", "train.log_interval=5",
                       f"train.output_dir={out}"]
                subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
                history = [json.loads(line) for line in Path(out, "history.jsonl").read_text().splitlines()]
                speeds = [r["tokens_per_s"] for r in history if "split" not in r and r["step"] > 10]
                rows.append({"ranks": nproc, "gs_weight": gs, "tokens_per_s": statistics.median(speeds)})
                print(f"throughput {nproc} rank(s), gs_weight {gs}: {rows[-1]['tokens_per_s']:,.0f} tokens/s",
                      flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Training-step benchmark ({m['device']}, torch {m['torch']}, DeepSpeed {m['deepspeed']}, "
             f"{m['threads']} threads)", "", f"Command: `{result['command']}`", "",
             "## One training step (fwd + bwd + AdamW), one process, MoGE vs MoE interleaved", "",
             "| preset | E | micro-batch | MoE s/step | MoGE s/step | time ratio | block ratios q1-q3 | MoE peak MB | "
             "MoGE peak MB | memory ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        lines.append(f"| {r['kind']} | {r['E']} | {r['micro_batch']} | {r['moe_s']:.4f} | {r['moge_s']:.4f} | "
                     f"{r['time_ratio']:.3f} | {r['block_ratio_q1']:.3f}-{r['block_ratio_q3']:.3f} | "
                     f"{r['moe_peak_mb']:.0f} | {r['moge_peak_mb']:.0f} | "
                     f"{r['memory_ratio']:.4f} |")
    if result.get("throughput"):
        lines += ["", "## Main-job preset through the launcher: tokens/s (median over logged intervals)", "",
                  "| ranks | gs_weight | tokens/s |", "|---|---|---|"]
        for r in result["throughput"]:
            lines.append(f"| {r['ranks']} | {r['gs_weight']} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    parser.add_argument("--memory-child", nargs=4, metavar=("KIND", "E", "GS", "MICRO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        kind, e, gs, micro = args.memory_child
        peak_memory_child(kind, int(e), float(gs), int(micro))
        return
    grid = [("gpt", 16, 8)] if args.quick else [("gpt", 16, 8), ("gpt", 32, 8), ("gpt", 64, 8), ("vit", 16, 32),
                                                ("vit", 64, 32)]
    rows = []
    for kind, e, micro in grid:
        row = step_times(kind, e, micro, blocks=4 if args.quick else 21, per_block=3 if args.quick else 4)
        row.update(peak_memory(kind, e, micro, repeats=1 if args.quick else 3))
        print(f"step {kind} E={e}: time ratio {row['time_ratio']:.3f}, memory ratio {row['memory_ratio']:.4f}",
              flush=True)
        rows.append(row)
    command = "python -m bench.bench_step" + (" --quick" if args.quick else "")
    result = {"machine": describe_machine(), "command": command,
              "steps": rows, "throughput": [] if args.quick else rank_throughput(steps=60)}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "step_quick" if args.quick else "step"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}.md").write_text(markdown(result))
    print(f"wrote {args.out / name}.md")


if __name__ == "__main__":
    main()
