"""Ranks die with their launcher.

DeepSpeed's runner forwards signals to its ranks only for multi-node pdsh: a SIGTERM to the
``deepspeed`` process (a job manager that signals only the process it started, ``kill PID``)
ends the runner at once, while ``deepspeed.launcher.launch`` and every rank are reparented to
pid 1 and train on, holding the GPUs. SIGKILL cannot be forwarded by anyone. So each rank watches
the processes that launched it and ends itself, within about a second, once any of them is gone.

Which processes: the rank's ancestors from its parent up to the outermost launcher among its
nearest :data:`_MAX_DEPTH` ancestors (the deepspeed runner and ``launch.py``, mpiexec and its
hydra proxy, torchrun, srun/slurmstepd, our ``launch/*.sh`` scripts). Nothing above the outermost
launcher is watched, so ``nohup deepspeed ... &`` survives its shell's logout as users expect.

The deepspeed runner can also be gone before the rank looks (killed within the second or two a rank
takes to start): the rank then finds ``launch.py``, which the runner (or pdsh's remote shell) starts,
adopted by init (pid 1), and ends at once; unless init is itself a launcher (a container whose
entrypoint is ``deepspeed``). Other launchers' early deaths are not detected: a rank directly under
init may be a torchrun rank whose torchrun died or one that ``accelerate launch`` (pid 1 of a
container) started in-process, and only the second is common.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import psutil

# argv[0] or, for interpreter scripts, argv[1] basenames that start ranks.
LAUNCHER_PROGRAMS = frozenset({
    "deepspeed", "mpiexec", "mpirun", "mpiexec.hydra", "hydra_pmi_proxy", "orted", "prterun", "prted",
    "torchrun", "srun", "slurmstepd", "train.sh", "mpi.sh", "multinode.sh"})
# Modules run with ``python -m`` that start ranks.
LAUNCHER_MODULES = frozenset({"deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run"})
_MAX_DEPTH = 6


def is_launcher(cmdline: list[str]) -> bool:
    """Whether a process with this ``cmdline`` starts ranks."""
    # slurmstepd retitles itself "slurmstepd: [<job>.<step>]": the name is what precedes the colon.
    programs = {os.path.basename(arg).split(":")[0] for arg in cmdline[:2]}
    modules = {cmdline[i + 1] for i, arg in enumerate(cmdline[:-1]) if arg == "-m"}
    return bool(programs & LAUNCHER_PROGRAMS or modules & LAUNCHER_MODULES)


def launcher_chain(process: psutil.Process | None = None) -> list[psutil.Process]:
    """The ancestors to watch: parent up to the outermost launcher within reach ([] if none)."""
    ancestors = []
    current = process or psutil.Process()
    for _ in range(_MAX_DEPTH):
        try:
            current = current.parent()
            if current is None or current.pid == 1:
                break
            ancestors.append((current, is_launcher(current.cmdline())))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            break
    outermost = max((i for i, (_, launcher) in enumerate(ancestors) if launcher), default=-1)
    return [p for p, _ in ancestors[:outermost + 1]]


def already_gone(chain: list[psutil.Process]) -> str | None:
    """Which launcher was gone before this rank looked (see the module docstring), or None."""
    if not chain:
        return None
    top = chain[-1]
    try:
        orphaned = top.ppid() == 1 and "deepspeed.launcher.launch" in top.cmdline()
    except psutil.Error:  # launch.py itself ended meanwhile
        return "launch.py"
    if orphaned and not _init_is_a_launcher():  # a container's entrypoint launcher is pid 1 itself
        return "the deepspeed runner that started launch.py"
    return None


def _init_is_a_launcher() -> bool:
    try:
        return is_launcher(psutil.Process(1).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def first_gone(chain: list[psutil.Process]) -> psutil.Process | None:
    """The first watched process that has exited (``is_running`` also catches a reused pid)."""
    return next((p for p in chain if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE), None)


def die_with_launcher(label: str, poll_s: float = 1.0) -> list[psutil.Process]:
    """Start a daemon thread that ends this process (exit 1, one line on stderr) when a process
    of its :func:`launcher_chain` is gone, or end it now if one was gone before (:func:`already_gone`);
    returns the chain (empty: nothing to watch, no thread)."""
    chain = launcher_chain()
    lost = already_gone(chain)
    if lost:
        print(f"{label}: {lost} is gone: stopping this rank", file=sys.stderr, flush=True)
        os._exit(1)
    if not chain:
        return chain
    names = {p.pid: " ".join(p.cmdline()[:2]) for p in chain}

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            try:
                gone = first_gone(chain)
            except psutil.NoSuchProcess:  # status() of one that exited between the two calls
                gone = next(p for p in chain if not p.is_running())
            if gone is not None:
                try:
                    print(f"{label}: the launcher process {gone.pid} ({names[gone.pid]}) is gone: stopping this "
                          f"rank", file=sys.stderr, flush=True)
                finally:  # stderr may be a pipe that died with the launcher (BrokenPipeError)
                    os._exit(1)  # the job is over; nothing is left to finish cleanly with

    threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()
    return chain
