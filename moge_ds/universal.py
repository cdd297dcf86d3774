"""Convert a checkpoint to DeepSpeed's Universal Checkpoint format, to resume it in another layout.

    python -m moge_ds.universal runs/mixtral/checkpoints --out runs/mixtral_ep4/checkpoints
    deepspeed ... --module moge_ds.train ... --set train.output_dir=runs/mixtral_ep4 --resume

A ZeRO-3 or AutoEP checkpoint is partitioned by its data-parallel and expert-parallel sizes; the
universal format (``ds_to_universal``) holds every weight and optimizer state whole, experts under
their global index, so a run with another world size or ``autoep_size`` can load it, optimizer
included. The trainer sees the ``universal`` mark in our state and loads it as such.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from moge_ds.checkpoint import (STATE_FILE, CheckpointError, check_new_dir, checkpoint_dir, read_state, staged_dir,
                                write_atomic)


def ds_to_universal(tag_dir: Path, out: Path) -> None:
    """Run DeepSpeed's converter on one tag directory into ``out`` (which it creates)."""
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(tag_dir), "--output_folder", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"DeepSpeed's ds_to_universal cannot convert {tag_dir}:\n"
                              f"{(proc.stdout + proc.stderr)[-3000:]}")


def convert(checkpoint: Path, out_root: Path) -> Path:
    """``out_root/<tag>``: the universal form of ``checkpoint`` (a root or a tag), made the one to resume."""
    tag_dir = checkpoint_dir(checkpoint)
    target = out_root / tag_dir.name
    _check_new_root(out_root, target)
    state = read_state(tag_dir)
    kind = state.get("config", {}).get("model", {}).get("kind")
    if kind != "hf":
        raise CheckpointError(f"{tag_dir} is a {kind} run's checkpoint: gpt and vit checkpoints need no conversion, "
                              f"they load into another world size or moe.ep_size directly with --resume (the "
                              f"universal format is for Hugging Face models under AutoEP and ZeRO-3)")
    with staged_dir(target) as staging:  # a killed conversion leaves no half-written tag
        ds_to_universal(tag_dir, staging)
        write_atomic(staging / STATE_FILE, json.dumps({**state, "universal": True}, indent=1))
    (out_root / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer; ours is `latest`
    write_atomic(out_root / "latest", tag_dir.name)
    return target


def _check_new_root(out_root: Path, target: Path) -> None:
    """The conversion makes a new checkpoints directory; a killed conversion's leftover does not count."""
    if target.exists() or (out_root / "latest").exists():
        raise CheckpointError(f"{out_root} already holds checkpoints ({target.name if target.exists() else 'latest'}): "
                              f"give a new --out (nothing is overwritten)")
    check_new_dir(out_root, "the conversion")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moge_ds.universal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoints root (newest complete tag) or a step<N> dir")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoints directory of the run to resume")
    args = parser.parse_args(argv)
    try:
        target = convert(args.checkpoint, args.out)
    except CheckpointError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {target}; resume it with train.output_dir={args.out.parent} --resume")


if __name__ == "__main__":
    main()
