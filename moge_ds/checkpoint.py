"""Checkpoints: DeepSpeed's own files (experts included) plus our state, committed atomically.

DeepSpeed writes ``latest`` from rank 0 before the other ranks have finished their files, so a
crash mid-save can leave it pointing at an incomplete checkpoint. We therefore save with
``save_latest=False`` and commit ourselves: after a barrier (every rank's files are on disk),
rank 0 writes ``moge_state.json`` into the tag directory and then replaces ``latest`` atomically.
A tag directory without ``moge_state.json`` is incomplete and is never resumed from.

Our state is JSON and the RNG states are plain tensors read with ``weights_only=True``.
DeepSpeed's own files are pickles: loading a checkpoint from an untrusted source can run code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from moge_ds.distributed import collective_device

log = logging.getLogger(__name__)

STATE_FILE = "moge_state.json"
_TAG = re.compile(r"^step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem.

    ``rank_specific``: found by this rank only (other ranks may not see the file), so this rank
    reports it rather than rank 0 alone.
    """

    def __init__(self, message: str, rank_specific: bool = False):
        super().__init__(message)
        self.rank_specific = rank_specific


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(root: Path) -> list[str]:
    """Tags under ``root`` whose save finished, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))


def save(engine, root: Path, step: int, state: dict, keep_last: int = 0) -> Path:
    """Save the engine and ``state`` (JSON-serialisable) as tag ``step<N>``; collective."""
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        torch.save({"torch": torch.get_rng_state()}, root / tag / f"rng_rank{rank:05d}.pt")
    except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError ("iostream error")
        free = shutil.disk_usage(root).free / 2**30 if root.is_dir() else float("nan")
        raise CheckpointError(f"cannot write checkpoint {root / tag}: {type(err).__name__}: {str(err)[:500]} "
                              f"({free:.2f} GiB free there; a full disk or a path that is not a directory "
                              f"are the usual causes). The previous checkpoint is intact", rank_specific=True) \
            from None
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        write_atomic(root / tag / STATE_FILE, json.dumps(state, indent=1))
        write_atomic(root / "latest", tag)
        if keep_last > 0:
            for old in complete_tags(root)[:-keep_last]:
                shutil.rmtree(root / old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return root / tag


def read_state(checkpoint_dir: Path) -> dict:
    """Our JSON state of one complete checkpoint directory (``root/step<N>``)."""
    path = checkpoint_dir / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a complete moge-ds checkpoint (no {STATE_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is corrupt: {err}") from None


def newest_tag(root: Path) -> Optional[str]:
    """The tag to resume from: the one ``latest`` names when that save is complete, else the newest
    complete tag by step (a crash between a save and the update of ``latest``); None if none."""
    tags = complete_tags(root)
    latest = root / "latest"
    named = latest.read_text().strip() if latest.is_file() else None
    if named in tags:
        return named
    if named is not None and not tags:
        raise CheckpointError(f"{latest} names {named}, but {root} holds no complete checkpoint (no step<N>/"
                              f"{STATE_FILE}): restore the checkpoints, or start afresh with --overwrite")
    if named is not None:
        log.warning("%s names %s, which is not a complete checkpoint: resuming from %s", latest, named, tags[-1])
    return tags[-1] if tags else None


def checkpoint_dir(path: Path) -> Path:
    """A tag directory: ``path`` itself, or the one a resume would take under a checkpoints root."""
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / STATE_FILE).is_file():
        return path
    tag = newest_tag(path)
    if tag is None:
        raise CheckpointError(f"{path} holds no complete moge-ds checkpoint (no step<N>/{STATE_FILE})")
    return path / tag


def damaged_files(tag_dir: Path) -> list[str]:
    """The ``.pt`` files of a checkpoint that are not whole torch archives (truncated, overwritten).

    Reads only each archive's directory at its end, so it is cheap for any checkpoint size.
    """
    damaged = []
    for path in sorted(tag_dir.glob("*.pt")):
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as err:
            damaged.append(f"{path} ({err})")
    return damaged


def check_readable(tag_dir: Path) -> None:
    """Every rank checks the files it can see; all fail together (no rank waits alone in a collective),
    and the ranks that found a damaged file name it."""
    damaged = damaged_files(tag_dir)
    found = torch.tensor([float(bool(damaged))], device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    if damaged:
        raise CheckpointError(f"damaged checkpoint files: {'; '.join(damaged)}. Resume from an earlier "
                              f"checkpoint (move this tag away) or start afresh with --overwrite", rank_specific=True)
    if found.item():
        raise CheckpointError(f"another rank found a damaged file in {tag_dir} (its message names it)")


def find_resume_tag(root: Path) -> Optional[str]:
    """The tag :func:`newest_tag` picks, checked readable on every rank (collective); None if none.

    Called before the engine is built, so a bad checkpoint stops the run before it writes anything.
    """
    tag = newest_tag(root)
    if tag is not None:
        read_state(root / tag)
        check_readable(root / tag)
    return tag


def is_universal(tag_dir: Path) -> bool:
    """Whether a complete checkpoint was made by ``moge_ds.universal`` (DeepSpeed must be told,
    ``checkpoint.load_universal`` in the ds_config, before its engine is built)."""
    return bool(read_state(tag_dir).get("universal"))


def _load(engine, root: Path, tag: str, load_optimizer_states: bool) -> None:
    try:
        load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=load_optimizer_states)
    except (RuntimeError, KeyError, OSError, EOFError, AssertionError) as err:
        raise CheckpointError(f"cannot load {root / tag} into this model: {type(err).__name__}: "
                              f"{str(err)[:2000]}") from None
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no model states in {root / tag}")


def resume(engine, root: Path, tag: str, world_size: int, ep_size: int) -> dict:
    """Load checkpoint ``tag`` (from :func:`find_resume_tag`) under ``root`` into ``engine``; its state.

    Model weights load whatever the world and expert-parallel sizes (DeepSpeed stores every expert
    in its own file, named by global index). ZeRO's optimizer partitions depend on both sizes, so
    when either changed the optimizer state is reset (with a warning) and the RNG states, which
    belong to the old ranks, are not restored. A universal checkpoint (``moge_ds.universal``) loads
    whole into any layout, optimizer state included.
    """
    state = read_state(root / tag)
    same_layout = (state.get("world_size"), state.get("ep_size")) == (world_size, ep_size)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if state.get("universal"):  # whole tensors: DeepSpeed reshards weights and optimizer state alike
        _load(engine, root, tag, load_optimizer_states=True)
        return state
    if not same_layout and rank == 0:
        log.warning("%s was saved with world size %s and ep_size %s, this run has %d and %d: loading the model "
                    "weights and LR schedule, resetting the optimizer state (ZeRO partitions do not carry over)",
                    root / tag, state.get("world_size"), state.get("ep_size"), world_size, ep_size)
    _load(engine, root, tag, load_optimizer_states=same_layout)
    rng_file = root / tag / f"rng_rank{rank:05d}.pt"
    if same_layout and rng_file.is_file():
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    return state
