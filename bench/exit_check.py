"""Clean exits, counted: back-to-back short 2-rank jobs, each must end with status 0 and no abort.

    python -m bench.exit_check [--runs 50] [--out bench/results]

Two kinds of job, ``--runs`` of each, one after the other: ``moge_ds.train`` through
``launch/train.sh`` (3 steps, a checkpoint, the final evaluation), and the resharding test helper
``tests/dist/reshard_check.py`` (load that checkpoint into 2 ranks, a training step). A job is
abnormal if any process exits non-zero, does not end within 5 minutes, or prints an abort
("terminate called", a signal exit, a traceback).
Needs the default data (``make data``). Writes ``<out>/exit_check.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.environment import describe_machine
from moge_ds.experiments.runner import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.dim=32", "model.depth=2", "model.heads=2", "model.seq_length=32", "moe.num_experts=4",
        "moe.map_shape=[2,2]", "moe.padding=circular", "moe.ep_size=2", "moe.drop_tokens=false",
        "model.vocab_size=8000", "train.steps=3", "train.eval_interval=0", "train.log_interval=1",
        "data.split=98,1,1"]
# A 3-step job takes well under a minute; five minutes means it hangs.
JOB_TIMEOUT_S = 300
ABORT_SIGNS = ("terminate called", "exits with return code = -", "Traceback", "core dumped")


def train_job(out: Path) -> list[str]:
    return [str(REPO / "launch/train.sh"), "--nproc", "2", "--master-port", str(free_port()), "--", "--set", *TINY,
            f"train.output_dir={out}"]


def reshard_job(checkpoints: Path, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            str(REPO / "tests/dist/reshard_check.py"), "--checkpoints", str(checkpoints), "--ds",
            str(REPO / "ds_configs/cpu.json"), "--out", str(out), "--set", *TINY]


def run(cmd: list[str]) -> dict:
    """One job in its own session, so that a hang can be ended whole and counted as abnormal."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        hung = True
    signs = [sign for sign in ABORT_SIGNS if sign in output] + (["hung"] if hung else [])
    return {"returncode": proc.returncode, "abort_signs": signs, "seconds": time.perf_counter() - started,
            "abnormal": proc.returncode != 0 or bool(signs), "tail": output[-3000:] if signs or proc.returncode else ""}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.exit_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"train": [], "reshard_helper": []}
    with tempfile.TemporaryDirectory(prefix="moge_exit_") as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"train{i}"
            results["train"].append(run(train_job(out)))
            source = out / "checkpoints"
            results["reshard_helper"].append(run(reshard_job(source, Path(tmp) / f"reshard{i}")))
            shutil.rmtree(out, ignore_errors=True)
            print(f"[{i + 1}/{args.runs}] abnormal so far: train "
                  f"{sum(r['abnormal'] for r in results['train'])}, helper "
                  f"{sum(r['abnormal'] for r in results['reshard_helper'])}", flush=True)
    summary = {kind: {"runs": len(rows), "abnormal": sum(r["abnormal"] for r in rows),
                      "median_seconds": sorted(r["seconds"] for r in rows)[len(rows) // 2]}
               for kind, rows in results.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exit_check.json").write_text(json.dumps({"machine": describe_machine(), "summary": summary,
                                                          "runs": results}, indent=1))
    lines = ["# Clean exits of back-to-back 2-rank jobs", "", f"`python -m bench.exit_check --runs {args.runs}`", "",
             "| job | runs | abnormal exits | median seconds |", "|---|---|---|---|"]
    lines += [f"| {kind} | {s['runs']} | {s['abnormal']} | {s['median_seconds']:.1f} |" for kind, s in summary.items()]
    (args.out / "exit_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
