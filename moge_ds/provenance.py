"""What a run ran: the code's commit (and whether the tree had uncommitted code changes), the
package versions and the command line. One JSON line per invocation, so a resumed run shows
every code version that contributed to it."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PROVENANCE_FILE = "provenance.jsonl"
PACKAGES = ("torch", "deepspeed", "transformers", "megatron-core", "numpy")
# Sweeps write their results inside the checkout while they run: that is output, not code.
_NOT_CODE = (":(exclude)results", ":(exclude)runs", ":(exclude)data")


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def collect(argv: list[str] | None = None) -> dict:
    """This process's provenance; ``commit`` is None outside a git checkout (an installed package)."""
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *_NOT_CODE) if commit else None
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit,
            "dirty": bool(changes) if changes is not None else None,
            "command": [sys.executable, *(sys.argv if argv is None else argv)],
            "python": platform.python_version(), "host": platform.node(),
            "packages": {name: _version(name) for name in PACKAGES}}


def record(run_dir: Path, argv: list[str] | None = None) -> dict:
    """Append this invocation's provenance to ``run_dir/provenance.jsonl``; return it."""
    entry = collect(argv)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / PROVENANCE_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def read(run_dir: Path) -> list[dict]:
    path = run_dir / PROVENANCE_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def describe(run_dir: Path) -> str:
    """``abc1234`` or ``abc1234+dirty``, joined with ``,`` when a resume ran other code; ``?`` if unrecorded."""
    names = [f"{e['commit'][:7]}{'+dirty' if e['dirty'] else ''}" if e.get("commit") else "no-git"
             for e in read(run_dir)]
    return ",".join(dict.fromkeys(names)) or "?"
