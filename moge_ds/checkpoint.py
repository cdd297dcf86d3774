"""Checkpoints: DeepSpeed's own files (experts included) plus our state, committed atomically.

DeepSpeed writes ``latest`` from rank 0 before the other ranks have finished their files, so a
crash mid-save can leave it pointing at an incomplete checkpoint. We therefore save with
``save_latest=False`` and commit ourselves: after a barrier (every rank's files are on disk),
rank 0 writes ``moge_state.json`` into the tag directory and then replaces ``latest`` atomically.
A tag directory without ``moge_state.json`` is incomplete and is never resumed from.

Each save also records every file's size and CRC-32 under ``checksums/`` (the ranks share the
hashing); a resume checks them first, so a deleted file or flipped bytes are named before any
rank loads anything.

Our state is JSON and the RNG states are plain tensors read with ``weights_only=True``.
DeepSpeed's own files are pickles: loading a checkpoint from an untrusted source can run code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from moge_ds.distributed import collective_device

log = logging.getLogger(__name__)

STATE_FILE = "moge_state.json"
CHECKSUM_DIR = "checksums"  # one record per saving rank
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


def check_new_dir(out: Path, what: str) -> None:
    """``out`` may receive a new ``what``: it does not exist, or is an empty directory (a killed
    writer's leftovers aside), so nothing writes into a run, checkpoints, a model or an export."""
    if not out.exists():
        return
    # A killed writer leaves its staging directory, and a killed conversion DeepSpeed's `latest_universal`.
    held = sorted(p.name for p in out.iterdir() if ".partial-" not in p.name and p.name != "latest_universal") \
        if out.is_dir() else ["(it is a file)"]
    if held:
        raise CheckpointError(f"{out} is not empty (it holds {', '.join(held[:6])}): {what} writes a new directory; "
                              f"give a new path (nothing is overwritten)")


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A hidden sibling of ``out`` to write a whole directory into: renamed to ``out`` when the
    block ends well, removed when it fails, so ``out`` is never half-written. A writer that was
    killed leaves its sibling behind; the next writer of ``out`` removes it. ``out`` must not
    exist or be empty (callers name what they refuse to write over)."""
    check_new_dir(out, "this")
    host = socket.gethostname()
    for stale in out.parent.glob(f".{out.name}.partial-{host}-*"):  # another host's writer may be alive
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.partial-{host}-{os.getpid()}"
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            out.rmdir()
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
        if dist.is_initialized():
            dist.barrier()
        write_checksums(root / tag)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError ("iostream error")
        free = shutil.disk_usage(root).free / 2**30 if root.is_dir() else float("nan")
        raise CheckpointError(f"cannot write checkpoint {root / tag}: {type(err).__name__}: {str(err)[:500]} "
                              f"({free:.2f} GiB free there; a full disk or a path that is not a directory "
                              f"are the usual causes). The previous checkpoint is intact", rank_specific=True) \
            from None
    if dist.is_initialized():
        dist.barrier()  # every rank's checksums are written before the tag is marked complete
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
        log.warning("%s names %s, which is not a complete checkpoint: using the newest complete one, %s", latest,
                    named, tags[-1])
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


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def write_checksums(tag_dir: Path) -> None:
    """Record ``[size, crc32]`` of this rank's share of the tag's files (every world-th of the sorted
    files it sees) in ``checksums/rank<r>.json``, on its own storage: with node-local storage each
    node records, and later checks, the files it holds."""
    rank, world = _rank_world()
    files = sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file()
                   and p.name != STATE_FILE and p.relative_to(tag_dir).parts[0] != CHECKSUM_DIR)
    mine = {name: [(tag_dir / name).stat().st_size, _crc32(tag_dir / name)] for name in files[rank::world]}
    (tag_dir / CHECKSUM_DIR).mkdir(exist_ok=True)
    write_atomic(tag_dir / CHECKSUM_DIR / f"rank{rank:05d}.json", json.dumps(mine))


def mismatched_files(tag_dir: Path) -> list[str]:
    """Files that differ from the save, among the records this rank checks: those of the saving
    ranks ``p`` with ``p % world == rank`` that it can see (none for checkpoints saved before
    checksums existed)."""
    rank, world = _rank_world()
    parts = sorted((tag_dir / CHECKSUM_DIR).glob("rank*.json"))
    problems = []
    for part in (p for p in parts if int(p.stem[4:]) % world == rank):
        for name, (size, crc) in sorted(json.loads(part.read_text()).items()):
            file = tag_dir / name
            if not file.is_file():
                problems.append(f"{file} is missing")
            elif file.stat().st_size != size:
                problems.append(f"{file} has {file.stat().st_size} bytes, {size} when saved (truncated or replaced)")
            elif _crc32(file) != crc:
                problems.append(f"{file} differs from what was saved (checksum mismatch: changed bytes)")
    return problems


def check_readable(tag_dir: Path) -> None:
    """Every rank checks the files it can see; all fail together (no rank waits alone in a collective),
    and the ranks that found a damaged file name it."""
    damaged = mismatched_files(tag_dir) or damaged_files(tag_dir)
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
