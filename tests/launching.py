"""Start real ranks for the integration tests: the deepspeed launcher and mpirun, as subprocesses."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """``deepspeed --num_gpus N --master_port P <args>`` on this machine's CPU accelerator."""
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(num_ranks), "--master_port", str(free_port()), *args]
    return run_checked(cmd, cwd, timeout, env)
