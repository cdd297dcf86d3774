"""Per-rank host memory of loading a pretrained Hugging Face MoE under ZeRO-3, before and after moge-ds
built it as partitions.

    python -m bench.bench_loading [--ranks 2 4] [--work /tmp/bench_loading] [--out bench/results]

Writes a Mixtral of about 850 MiB (fp32 safetensors, per-expert layout as ``save_pretrained`` writes
it: the loader converts it layer by layer) under ``--work``, then for each rank count launches real
jobs through the ``deepspeed`` launcher (``ARMS``):

- ``whole``: what moge-ds did before, ``from_pretrained`` on every rank (the whole model per rank),
  then ``deepspeed.initialize`` partitions it;
- ``partitioned``: what ``moge_ds.hf.loading.build`` does, timed in its two phases: build the ZeRO-3
  partitions (without transformers' random initialisation), then fill each rank's partitions from its
  own reads of the checkpoint (``load_partitioned``);
- the same with glibc's mmap threshold fixed (see ``ARMS``).

Each rank reports its resident memory above its post-import baseline (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` between phases): the build peak, the build + load peak, what it holds after
loading, and the peak of ``deepspeed.initialize`` with AutoEP (``autoep_size`` = ranks), whose
repacking gathers one MoE layer's experts on every rank (reported apart; that layer's size is in the
header); initialize also allocates ZeRO-3's fp32 master partition. Last, the fixed threshold's cost:
seconds per CPU training step of the same model in one process, with and without it, alternated.
Writes ``<out>/loading.json`` and ``<out>/loading.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
# 10 layers of 8 SwiGLU experts (hidden 768, FFN 1024): about 225M parameters, 860 MiB in fp32.
SHAPE = dict(vocab_size=8000, hidden_size=768, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=12,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
             tie_word_embeddings=False)


def write_model(path: Path) -> dict:
    """The benchmark's Mixtral under ``path`` (kept between runs); its size facts."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**SHAPE)
    if not (path / "model.safetensors").is_file():
        torch.manual_seed(0)
        MixtralForCausalLM(config).save_pretrained(path)
    layer_experts = 3 * SHAPE["num_local_experts"] * SHAPE["hidden_size"] * SHAPE["intermediate_size"]
    return {"model_mib": (path / "model.safetensors").stat().st_size / MIB,
            "one_layer_experts_mib": layer_experts * 4 / MIB}


def memory() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak() -> int:
    """Restart ``VmHWM`` from the current resident set (Linux >= 4.0); returns that set."""
    Path("/proc/self/clear_refs").write_text("5")
    return memory()[0]


def measure_autoep_repack(record: dict) -> None:
    """Record the resident growth and peak of AutoEP's layer replacement (inside initialize) in ``record``."""
    from deepspeed.module_inject.auto_ep import AutoEP

    replace = AutoEP.replace_moe_layers

    def measured(*args, **kwargs):
        start = reset_peak()
        out = replace(*args, **kwargs)
        record["autoep_repack_peak_mib"] = (memory()[1] - start) / MIB
        return out
    AutoEP.replace_moe_layers = measured


def rank_job(mode: str, model_dir: str, out: str) -> None:
    """One rank: build + load, then initialize; rank 0 writes every rank's peaks to ``out``."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from moge_ds.distributed import init_job, shutdown
    from moge_ds.hf.families import read_config
    from moge_ds.hf.loading import load_partitioned, partitioned_building

    init_job()
    world = dist.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
          "expert_parallel": {"enabled": True, "autoep_size": world}}
    base = reset_peak()
    record = {"rank": dist.get_rank()}
    if mode == "whole":
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    else:
        with partitioned_building(ds, initialise=False):  # what hf.loading.build does, timed in two phases
            model = AutoModelForCausalLM.from_config(read_config(model_dir), dtype=torch.float32)
        record["build_peak_mib"] = (memory()[1] - base) / MIB
        load_partitioned(model, model_dir)
    record.update(load_peak_mib=(memory()[1] - base) / MIB, after_load_mib=(memory()[0] - base) / MIB)
    measure_autoep_repack(record)
    start = reset_peak()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    # The initialize peak counts from the start of initialize, above the baseline like the others.
    record["initialize_peak_mib"] = (memory()[1] - start) / MIB + record["after_load_mib"]
    peaks = [None] * world
    dist.all_gather_object(peaks, record)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(peaks))
    del engine
    shutdown()  # a barrier first: a rank that left early made gloo abort the other at exit


def step_job(model_dir: str) -> None:
    """One process trains the benchmark's model on the CPU (batch 4 x 256, AdamW): prints the median
    seconds per step over steps 3-8, the cost side of the allocator setting."""
    import statistics
    import time

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens = torch.randint(0, SHAPE["vocab_size"], (4, 256))
    seconds = []
    for _ in range(8):
        start = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
    print(json.dumps(statistics.median(seconds[2:])))


def step_times(model_dir: Path, rounds: int = 3) -> dict[str, list[float]]:
    """Seconds per CPU training step with and without the fixed threshold, alternated ``rounds`` times."""
    times: dict[str, list[float]] = {"default": [], "MALLOC_MMAP_THRESHOLD_=131072": []}
    for _ in range(rounds):
        for name, env in (("default", {}), ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
            cmd = [sys.executable, "-m", "bench.bench_loading", "--step-job", str(model_dir)]
            proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2", **env},
                                  capture_output=True, text=True, check=True)
            times[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return times


# The arms: (name, rank-job mode, extra environment). glibc's malloc raises its mmap threshold as large
# blocks are freed (up to 32 MiB), after which freed full-size tensors stay in the heap between the
# partitions that were kept: a fixed threshold returns them to the system.
ARMS = [("whole", "whole", {}), ("partitioned", "partitioned", {}),
        ("partitioned, MALLOC_MMAP_THRESHOLD_=131072", "partitioned", {"MALLOC_MMAP_THRESHOLD_": "131072"})]


def launch(mode: str, ranks: int, model_dir: Path, out: Path, env: dict) -> list[dict]:
    from moge_ds.experiments.runner import free_port

    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "--module", "bench.bench_loading", "--rank-job", mode, str(model_dir), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(out.read_text())


def markdown(result: dict) -> str:
    size = result["model"]
    machine = result["machine"]["device"]
    lines = [f"# Loading a pretrained Mixtral under ZeRO-3 + AutoEP: per-rank host memory ({machine})", "",
             f"Model: {size['model_mib']:.0f} MiB (fp32 safetensors, per-expert layout); one MoE layer's experts: "
             f"{size['one_layer_experts_mib']:.0f} MiB. Resident memory above each rank's post-import baseline, the "
             f"largest over ranks (x: fraction of the model). AutoEP repack: the growth peak of its layer "
             f"replacement alone. Command: `{result['command']}`", "",
             "| ranks | path | build peak | build + load peak | held after load | initialize peak | "
             "of which AutoEP repack |", "|---|---|---|---|---|---|---|"]
    keys = ("build_peak_mib", "load_peak_mib", "after_load_mib", "initialize_peak_mib", "autoep_repack_peak_mib")
    for row in result["rows"]:
        worst = {key: max(r.get(key, math.nan) for r in row["per_rank"]) for key in keys}
        cells = [f"{worst[k]:.0f} MiB ({worst[k] / size['model_mib']:.2f}x)" if worst[k] == worst[k] else "-"
                 for k in keys]
        lines.append(f"| {row['ranks']} | {row['mode']} | " + " | ".join(cells) + " |")
    steps = result["step_seconds"]
    default, fixed = (", ".join(f"{v:.2f}" for v in values) for values in steps.values())
    ratio = sum(steps["MALLOC_MMAP_THRESHOLD_=131072"]) / sum(steps["default"])
    lines += ["", f"The allocator setting's cost: one process training this model on the CPU (batch 4 x 256, AdamW), "
              f"seconds per step (median of steps 3-8), alternated: default {default}; fixed threshold {fixed} "
              f"({ratio:.2f}x)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_loading"), help="where the model is written")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    parser.add_argument("--rank-job", nargs=3, metavar=("MODE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--step-job", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = parser.parse_args()
    if args.rank_job:
        rank_job(*args.rank_job)
        return
    if args.step_job:
        step_job(args.step_job)
        return
    from bench.environment import describe_machine

    model_dir = args.work / "mixtral"
    result = {"machine": describe_machine(), "command": "python -m bench.bench_loading " + " ".join(sys.argv[1:]),
              "model": write_model(model_dir), "rows": []}
    for ranks in args.ranks:
        for i, (name, mode, env) in enumerate(ARMS):
            per_rank = launch(mode, ranks, model_dir, args.work / f"arm{i}_{ranks}.json", env)
            result["rows"].append({"ranks": ranks, "mode": name, "per_rank": per_rank})
            print(f"{ranks} ranks, {name}: {per_rank}", flush=True)
    result["step_seconds"] = step_times(model_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loading.json").write_text(json.dumps(result, indent=1))
    (args.out / "loading.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
