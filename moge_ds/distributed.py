"""Process-group state that entry points own: a group of one for single-process entry points
(evaluate, analysis, tests), and one timeout for every group of a training job.

Library code never starts torch.distributed; an entry point that calls code needing a rank
(megatron-core's dataset blending asks for one) opens this group of one and closes it again.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist


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
