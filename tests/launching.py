"""Start real ranks for the integration tests: the deepspeed launcher and mpirun, as subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from moge_ds.experiments.runner import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


__all__ = ["BIN", "REPO", "TINY", "free_port", "launch_deepspeed", "make_corpus", "run_checked", "tiny_train_args",
           "train"]

WORDS = ("expert router token group sparse map shift invariant layer gate softmax capacity energy kernel "
         "sigma neighbour topographic feature dictionary code").split()

# A 2-block GPT/ViT with 4 experts, small enough for 2 CPU ranks in seconds.
TINY = ["model.dim=32", "model.depth=2", "model.heads=2", "moe.num_experts=4", "moe.map_shape=[2,2]",
        "moe.padding=circular", "moe.ep_size=2", "train.log_interval=1", "train.eval_interval=4",
        "train.eval_batches=2"]


def make_corpus(root: Path, docs: int = 40, seed: int = 0) -> list[str]:
    """``docs`` text files of random sentences over a small vocabulary; returns their texts."""
    rng = np.random.default_rng(seed)
    texts = []
    for d in range(docs):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(rng.integers(3, 8))]
        texts.append("\n".join(lines) + "\n")
        (root / f"doc{d:03d}.txt").write_text(texts[-1], encoding="utf-8")
    return texts


def run_checked(cmd: list[str], cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure or timeout, fail with the tail of its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"")[-4000:] if isinstance(err.stdout, bytes) else (err.stdout or "")[-4000:]
        raise AssertionError(f"{cmd} timed out after {timeout}s:\n{out}") from err
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def launch_deepspeed(args: list[str], cwd: Path, num_ranks: int = 2, timeout: float = 300,
                     env: dict | None = None) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N --master_port P <args>`` on this machine's CPU accelerator; the job
    must leave none of DeepSpeed's shared-memory workspaces behind in /dev/shm."""
    port = free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(num_ranks), "--master_port", str(port), *args]
    proc = run_checked(cmd, cwd, timeout, env)
    leaked = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"the job left shared-memory segments behind: {leaked}"
    return proc


def train(workspace, out_name, *overrides, preset="gpt_tiny.yaml", resume=False, nproc=2, tiny=TINY,
          ds_config="ds.json"):
    """A ``tiny`` run of ``moge_ds.train`` on the workspace's data with the workspace's ``ds_config``;
    returns its directory and training records."""
    out = workspace / out_name
    data = [f"data.prefixes=[{workspace / 'text'}]", f"data.tokenizer={workspace / 'tok.model'}",
            "model.seq_length=32", "data.split=80,10,10", f"data.images=folder:{workspace / 'images'}",
            "data.valid_images=8"]
    args = ["--module", "moge_ds.train", "--config", str(REPO / "configs" / preset), "--deepspeed_config",
            str(workspace / ds_config), "--set", *tiny, *data, f"train.output_dir={out}", *overrides]
    launch_deepspeed(args + (["--resume"] if resume else []), cwd=workspace, num_ranks=nproc)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return out, [r for r in history if "split" not in r]


def tiny_train_args(workspace, out, steps=2):
    """Launcher arguments (``launch/*.sh``) for a TINY GPT run on the workspace's data."""
    return ["--config", str(REPO / "configs/gpt_tiny.yaml"), "--ds-config", str(workspace / "ds.json"), "--",
            "--set", *TINY, f"data.prefixes=[{workspace / 'text'}]", f"data.tokenizer={workspace / 'tok.model'}",
            "model.seq_length=32", "data.split=80,10,10", f"train.steps={steps}", f"train.output_dir={out}",
            "train.dist_timeout_s=60"]
