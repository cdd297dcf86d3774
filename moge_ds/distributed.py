"""Process-group set-up for single-process entry points (evaluate, analysis, tests).

Library code never starts torch.distributed; an entry point that calls code needing a rank
(megatron-core's dataset blending asks for one) opens this group of one and closes it again.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
