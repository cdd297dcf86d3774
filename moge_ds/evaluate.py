"""Perplexity (LM) or top-1 accuracy (ViT) of an exported model on any prepared dataset.

    python -m moge_ds.evaluate runs/gpt_tiny/export [--split test] [--set "data.prefixes=[data/other]"]

One process, no DeepSpeed engine: the export (``python -m moge_ds.export``) holds every expert.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moge_ds.checkpoint import CheckpointError
from moge_ds.config import ConfigError, apply_overrides
from moge_ds.data.documents import DataError
from moge_ds.distributed import single_process_group
from moge_ds.export import load_export


def evaluate(export_dir: Path, split: str = "test", overrides: tuple[str, ...] = (), micro_batch: int = 8,
             batches: int | None = None) -> dict[str, float]:
    check_counts(micro_batch, batches)
    # Imported here: megatron-core takes ~10 s to import, and bad counts are refused before that.
    from moge_ds.tasks import build_task

    model, config = load_export(export_dir)
    apply_overrides(config, overrides)
    # The task refuses a split with no share only if it will evaluate it: here that is `split` alone.
    config.train.final_eval, config.train.eval_interval = [split], 0
    task = build_task(config, micro_batch, rank=0, world=1, total_micro_batches=1, device=torch.device("cpu"))
    return task.evaluate(model, split, batches)


def check_counts(micro_batch: int, batches: int | None) -> None:
    """Refuse counts that would evaluate nothing (a metric over zero items), before loading anything."""
    if micro_batch < 1:
        raise ConfigError(f"--micro-batch must be >= 1, got {micro_batch}")
    if batches is not None and batches < 1:
        raise ConfigError(f"--batches must be >= 1 (leave it out to evaluate the whole split), got {batches}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moge_ds.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--split", choices=["valid", "test"], default="test")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                        help="point at other data, e.g. data.prefixes=[data/other]")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per forward pass (>= 1)")
    parser.add_argument("--batches", type=int, default=None,
                        help="micro-batches to use (>= 1; default: the whole split)")
    args = parser.parse_args(argv)
    try:
        with single_process_group():
            metrics = evaluate(args.export, args.split, tuple(args.set), args.micro_batch, args.batches)
    except (CheckpointError, ConfigError, DataError) as err:
        parser.exit(2, f"error: {err}\n")
    print(json.dumps({"split": args.split, **metrics}))


if __name__ == "__main__":
    main()
