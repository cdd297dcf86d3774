"""The GPU rehearsal: one node, one table, meant to take under 10 minutes (not yet timed on a GPU).

    python -m bench.gpu_check [--steps 60] [--work runs/gpu_check] [--cpu] [--overwrite]

Short runs of ``moge_ds.train`` through ``launch/train.sh`` on the Python-docs data (``make data``):

- our GPT, MoE vs MoGE (the only difference: ``moe.gs_weight``), bf16, ZeRO-2, one GPU: the step-time
  and peak-memory ratio MoGE/MoE;
- the same MoGE run in fp16 (loss scaling);
- a tiny Mixtral and a tiny DeepSeek-V3 under AutoEP, ZeRO-3, bf16, one GPU;
- with 2+ GPUs: our GPT with its experts split over 2 GPUs (NCCL all-to-all), and Mixtral with
  ``autoep_size`` 2.

Each row: whether it ran, the first and last logged loss, median tokens/s, peak GPU memory (rank 0).
Writes ``<work>/gpu_check.md``. ``--cpu`` runs the same rows on CPU configs (fp32, 2 gloo ranks): a check
of the script itself, not of a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    name: str
    preset: str
    ds_config: str
    ranks: int = 1
    overrides: list[str] = field(default_factory=list)


def plan(gpus: int, cpu: bool) -> list[Run]:
    """The rows for this node. On CPU every config is its fp32 CPU counterpart and ranks are 2."""
    single = ["moe.ep_size=1"]
    runs = [Run("gpt MoE bf16 ZeRO-2", "gpt_tiny", "zero2_bf16.json", overrides=single + ["moe.gs_weight=0"]),
            Run("gpt MoGE bf16 ZeRO-2", "gpt_tiny", "zero2_bf16.json", overrides=single),
            Run("gpt MoGE fp16 ZeRO-2", "gpt_tiny", "zero2_fp16.json", overrides=single),
            Run("Mixtral AutoEP ZeRO-3 bf16", "mixtral_tiny", "autoep_zero3_bf16.json"),
            Run("DeepSeek-V3 AutoEP ZeRO-3 bf16", "mixtral_tiny", "autoep_zero3_bf16.json",
                overrides=["model.hf_path=configs/hf/deepseek_v3_tiny", "moe.bias_update_rate=0.001"])]
    if gpus >= 2:
        runs += [Run("gpt MoGE bf16, experts over 2 GPUs (NCCL)", "gpt_tiny", "zero2_bf16.json", ranks=2,
                     overrides=["moe.ep_size=2"]),
                 Run("Mixtral AutoEP ZeRO-3 bf16, autoep_size 2", "mixtral_tiny", "autoep_zero3_bf16.json", ranks=2)]
    if cpu:
        for run in runs:
            run.ds_config = "autoep_zero3_cpu.json" if run.ds_config.startswith("autoep") else "cpu.json"
            run.ranks = 2
    return runs


def ds_config_for(run: Run, work: Path) -> Path:
    """The run's ds_config with AutoEP's size set to its rank count."""
    ds = json.loads((REPO / "ds_configs" / run.ds_config).read_text())
    if "expert_parallel" in ds:
        ds["expert_parallel"]["autoep_size"] = run.ranks
    path = work / f"{run.name.replace(' ', '_').replace(',', '')}.ds.json"
    path.write_text(json.dumps(ds))
    return path


def execute(run: Run, steps: int, work: Path) -> dict:
    out = work / run.name.replace(" ", "_").replace(",", "")
    cmd = [str(REPO / "launch/train.sh"), "--nproc", str(run.ranks), "--preset", run.preset, "--ds-config",
           str(ds_config_for(run, work)), "--", "--overwrite", "--set", f"train.steps={steps}", "train.log_interval=5",
           "train.eval_interval=0", "train.save_interval=0", "train.final_eval=[]", f"train.output_dir={out}",
           *run.overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    history = out / "history.jsonl"
    records = [json.loads(line) for line in history.read_text().splitlines()] if history.is_file() else []
    records = [r for r in records if "split" not in r]
    if proc.returncode != 0 or not records:
        return {"run": run.name, "ranks": run.ranks, "status": f"FAILED (exit {proc.returncode})",
                "error": (proc.stdout + proc.stderr)[-2000:]}
    rate = next(k for k in records[-1] if k.endswith("_per_s"))
    return {"run": run.name, "ranks": run.ranks, "status": "ok", "first_loss": records[0]["loss"],
            "last_loss": records[-1]["loss"], "per_s": statistics.median(r[rate] for r in records[1:] or records),
            "peak_mib": max((r.get("gpu_memory_peak_mib", float("nan")) for r in records), default=float("nan"))}


def table(rows: list[dict]) -> str:
    lines = ["| run | ranks | status | loss first -> last | tokens/s (median) | peak GPU MiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['run']} | {r['ranks']} | {r['status']} | | | |")
            continue
        lines.append(f"| {r['run']} | {r['ranks']} | ok | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
                     f"{r['per_s']:,.0f} | {r['peak_mib']:.0f} |")
    moe, moge = rows[0], rows[1]
    if moe["status"] == moge["status"] == "ok":
        lines += ["", f"MoGE/MoE (gpt, bf16 ZeRO-2): step time {moe['per_s'] / moge['per_s']:.3f}x, "
                      f"peak memory {moge['peak_mib'] / moe['peak_mib']:.3f}x"]
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--work", type=Path, default=REPO / "runs/gpu_check")
    parser.add_argument("--cpu", action="store_true", help="CPU configs: checks this script, not a GPU")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier check in --work")
    args = parser.parse_args()
    if args.work.exists() and any(args.work.iterdir()) and not args.overwrite:
        raise SystemExit(f"{args.work} already holds files (an earlier check?): pass --overwrite to replace its runs, "
                         f"or give another --work")
    gpus = torch.cuda.device_count()
    if not gpus and not args.cpu:
        raise SystemExit("no GPU visible (torch.cuda.device_count() is 0): run on a GPU node, or pass --cpu")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in plan(gpus, args.cpu):
        rows.append(execute(run, args.steps, args.work))
        print(f"{run.name}: {rows[-1]['status']}", flush=True)
    text = table(rows)
    (args.work / "gpu_check.md").write_text(text)
    (args.work / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    print(text)
    for r in rows:
        if r["status"] != "ok":
            print(f"--- {r['run']} ---\n{r['error']}")


if __name__ == "__main__":
    main()
