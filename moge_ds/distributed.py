"""Process-group state that entry points own: a group of one for single-process entry points
(evaluate, analysis, tests), and one timeout for every group of a training job.

Library code never starts torch.distributed; an entry point that calls code needing a rank
(megatron-core's dataset blending asks for one) opens this group of one and closes it again.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger("moge_ds")
STALE_BUILD_LOCK_S = 600  # DeepSpeed's CPU ops build in about a minute here

@contextmanager
def single_process_group() -> Iterator[None]:
    """A gloo group of world size 1 for the ``with`` block; a no-op when one is already up."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="moge_ds_store_") as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(str(Path(tmp) / "store"), 1), rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def init_job(timeout: timedelta = timedelta(minutes=30)) -> None:
    """Start a multi-rank job's default process group through DeepSpeed, then release the names of
    DeepSpeed's CPU shared-memory workspaces (see ``release_shm_names``)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    warn_stale_build_locks()
    # mpirun starts ranks without RANK/MASTER_ADDR: DeepSpeed then discovers them through mpi4py.
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)), timeout=timeout)
    release_shm_names()


def warn_stale_build_locks() -> list[Path]:
    """Name torch extension build locks older than ``STALE_BUILD_LOCK_S``; returns them.

    DeepSpeed builds some ops on first use (on CPU, the shared-memory collective op that
    ``init_distributed`` loads), and torch serialises those builds on a plain ``lock`` file in the
    op's build directory. A process killed during a build leaves the file behind, and every later
    start then waits for it forever without a word (seen here: a 2-rank run silent for 7 minutes).
    Warned, not removed: a build in progress elsewhere holds a young lock.
    """
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    now = time.time()
    stale = [lock for lock in root.glob("*/*/lock") if now - lock.stat().st_mtime > STALE_BUILD_LOCK_S]
    for lock in stale:
        log.warning("%s is %.0f min old: a build killed midway left it, and DeepSpeed waits for it without end. "
                    "If no build of %s is running, remove it.", lock, (now - lock.stat().st_mtime) / 60,
                    lock.parent.name)
    return stale


def release_shm_names() -> int:
    """Unlink this rank's DeepSpeed CPU allreduce workspace from /dev/shm; returns how many were removed.

    DeepSpeed's CPU backend (``shm.cpp``) creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank>`` (64 MiB) when all ranks share a node, maps its peers' segments while
    ``init_distributed`` runs, and never unlinks them: every job leaked 64 MiB per rank of RAM-backed
    /dev/shm, until the OOM killer ended jobs (measured: 322 segments, 21 GiB), and a later job on the
    same port could map a dead job's segment. Once every rank has mapped its peers (the barrier), the
    names are not needed; the memory lives on until the job's processes exit, even when killed.
    """
    if not dist.is_initialized():
        return 0
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    segment = Path("/dev/shm") / name
    if not segment.exists():
        return 0
    segment.unlink(missing_ok=True)
    return 1


def collective_device() -> torch.device:
    """Where a tensor handed to a collective must live: the accelerator's device (NCCL takes GPU
    tensors only), the CPU under gloo."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def set_timeout_of_every_group(timeout: timedelta) -> int:
    """Give ``timeout`` to every process group this rank belongs to; returns how many.

    ``init_process_group``'s timeout reaches only the default group: groups made later with
    ``new_group`` (DeepSpeed's expert- and data-parallel groups) get the backend's default, 30
    minutes for gloo, so a frozen rank would hang the others that long.
    """
    from torch.distributed import distributed_c10d as c10d

    groups = [g for g in list(c10d._world.pg_map) if not c10d._rank_not_in_group(g)]
    for group in groups:
        c10d._set_pg_timeout(timeout, group)
    return len(groups)


def shutdown() -> None:
    """End a job's distributed work: a barrier, then destroy every process group (DeepSpeed's included).

    Without the barrier a rank that finishes first closes its connections while another still
    talks to it, and gloo aborts the late rank ("terminate called without an active exception").
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
