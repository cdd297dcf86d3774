"""What a benchmark ran on, recorded beside its numbers."""

from __future__ import annotations

import os
import platform

import torch


def describe_machine() -> dict:
    import deepspeed

    cpu = f"CPU ({platform.processor() or platform.machine()})"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    return {"device": device, "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "python": platform.python_version()}
