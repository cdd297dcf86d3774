"""Launch a sweep's missing runs through launch/train.sh, several at a time, with progress and ETA."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from moge_ds.experiments.sweep import REPO, Run, Sweep


def free_port() -> int:
    """A port nothing listens on now (sweeps may run side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sweep(sweep: Sweep, parallel: int) -> None:
    todo = [r for r in sweep.runs() if not (sweep.root / "runs" / r.name / "metrics.json").is_file()]
    total = len(sweep.runs())
    print(f"{sweep.name}: {total - len(todo)} of {total} runs done, {len(todo)} to go, {parallel} at a time",
          flush=True)
    # Split the cores between the runs at a time, unless the caller chose a thread count.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel)), **os.environ}
    started = time.perf_counter()
    done = 0

    def launch(run: Run) -> None:
        nonlocal done
        out = sweep.root / "runs" / run.name
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "launch.log", "w") as log:
            proc = subprocess.run(sweep.command(run, free_port()), stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=REPO)
        done += 1
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (len(todo) - done)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {out / 'launch.log'})"
        print(f"[{done}/{len(todo)}] {run.name}: {status}; {elapsed / 60:.1f} min elapsed, ETA {eta / 60:.1f} min",
              flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(launch, todo))
