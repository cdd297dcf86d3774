"""Train a GPT, ViT or Hugging Face MoE model with MoE/MoGE layers on DeepSpeed.

    deepspeed --num_gpus 2 --module moge_ds.train --config configs/gpt_tiny.yaml \\
        --deepspeed_config ds_configs/cpu.json [--set train.steps=500 moe.gs_weight=0.3] [--resume]

:func:`main` parses and validates (our config x ds_config x world size), then a :class:`Trainer`
builds data, model and engine, runs :meth:`Trainer.train` (sigma schedule, evaluation,
checkpoints, logging), :meth:`Trainer.finish` (whole-split evaluation, metrics.json, loss-curve
PNG) and :meth:`Trainer.close`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from moge_ds import checkpoint, lifeline, provenance
from moge_ds.config import Config, ConfigError, check_ranges, load_config, load_ds_config, validate
from moge_ds.data.documents import DataError
from moge_ds.distributed import collective_device, init_job, set_timeout_of_every_group
from moge_ds.export import init_from_export
from moge_ds.hf.families import HFModelError
from moge_ds.models import build_model
from moge_ds.monitor import RunLog, gate_terms, gather_expert_load, plot_loss_curve, read_history
from moge_ds.tasks import build_task

log = logging.getLogger("moge_ds")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moge_ds.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="our preset (YAML/JSON), e.g. configs/gpt_tiny.yaml")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON, e.g. ds_configs/cpu.json")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE", help="override our config")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run directory that holds an earlier run (its records are removed)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return parser.parse_args(argv)


class InputError(Exception):
    """Bad input found before training; ``kind`` says which (config, data, checkpoint, run directory).

    Rank 0 reports what every rank found alike; a rank-specific finding (a file only this rank
    reads) is reported by the rank that found it.
    """

    def __init__(self, kind: str, err: Exception):
        super().__init__(f"{kind} error: {err}")
        self.rank_specific = getattr(err, "rank_specific", False)


def setup(args: argparse.Namespace) -> tuple[Config, dict, "RunDirClaim"]:
    """Our config and the ds_config, validated together after torch.distributed is up, and the
    run directory claimed."""
    try:
        config = load_config(args.config, tuple(args.set))
        check_ranges(config)  # train.dist_timeout_s among them, before init_job uses it
    except ConfigError as err:
        raise InputError("config", err) from None
    config.train.resume = config.train.resume or args.resume
    if config.train.resume and args.overwrite:
        raise InputError("config", ConfigError("--resume and --overwrite contradict each other: choose one"))
    accelerator = get_accelerator()
    init_job(timedelta(seconds=config.train.dist_timeout_s))
    try:
        ds_config = validate(config, load_ds_config(args.deepspeed_config), dist.get_world_size(),
                             accelerator.is_bf16_supported(), bool(accelerator.is_fp16_supported()))
    except ConfigError as err:
        raise InputError("config", err) from None
    return config, ds_config, claim_run_dir(Path(config.train.output_dir), config.train.resume, args.overwrite)


# What a run writes into its directory; --overwrite removes exactly these.
RUN_RECORDS = ("checkpoints", "history.jsonl", "metrics.json", "config.json", "loss_curve.png", "monitor",
               provenance.PROVENANCE_FILE)
LOCK_FILE = ".moge_ds.lock"


@dataclass
class RunDirClaim:
    """A run directory this job holds. Rank 0 keeps its lock open for the job's life; the OS
    releases it when the process ends, however it ends.

    --overwrite is three steps, so that a start that fails loses nothing: :meth:`take` (the data
    checks passed) moves the earlier run's records aside into ``.overwritten-<pid>``,
    :meth:`commit` (the engine is built) deletes them, :meth:`abandon` (the start failed) moves
    them back. A start killed in between leaves them aside, whole."""

    out: Path
    lock: IO | None  # rank 0's locked file; None on the other ranks
    earlier: list[str]  # records of an earlier run that --overwrite replaces
    created: tuple[bool, bool]  # the claim made (``out``, its lock file): a refused start removes them

    @property
    def aside(self) -> Path:
        return self.out / f".overwritten-{os.getpid()}"

    def take(self) -> None:
        """Move the earlier records aside and say in the lock file who holds it (rank 0; the others wait)."""
        if self.lock is not None:
            if self.earlier:
                self.aside.mkdir()
                for name in self.earlier:
                    os.rename(self.out / name, self.aside / name)
            self.lock.truncate(0)
            self.lock.write(f"pid {os.getpid()} on {platform.node()}\n")
            self.lock.flush()
        dist.barrier()

    def commit(self) -> None:
        if self.lock is not None and self.aside.exists():
            shutil.rmtree(self.aside)

    def abandon(self) -> None:
        """A start refused after the claim: leave the directory as it was."""
        if self.lock is None:
            return
        if self.aside.exists():
            for path in self.aside.iterdir():
                os.rename(path, self.out / path.name)
            self.aside.rmdir()
        self.lock.close()
        made_dir, made_lock = self.created
        if made_lock:
            (self.out / LOCK_FILE).unlink(missing_ok=True)
        if made_dir:  # empty now, unless another process wrote there since
            with contextlib.suppress(OSError):
                self.out.rmdir()


def _lock(out: Path) -> tuple[IO | None, tuple[bool, bool], str]:
    """Rank 0 locks ``out``'s lock file: the open file and whether it made ``out`` and the lock file,
    or None and the last recorded holder."""
    created = (not out.exists(), not (out / LOCK_FILE).exists())
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        return None, (False, False), holder
    return handle, created, ""


def claim_run_dir(out: Path, resume: bool, overwrite: bool) -> RunDirClaim:
    """Lock the run directory and refuse to start afresh over an earlier run unless asked to; every
    rank gets rank 0's verdict (ranks on other nodes may not see the directory), so none goes on
    alone into a collective. Nothing is removed or written here: see :meth:`RunDirClaim.take`."""
    lock, created, holder = _lock(out) if dist.get_rank() == 0 else (None, (False, False), "")
    earlier = [name for name in RUN_RECORDS if (out / name).exists()]
    busy = dist.get_rank() == 0 and lock is None
    verdict = torch.tensor([2.0 if busy else float(bool(earlier) and not resume and not overwrite)],
                           device=collective_device())
    dist.broadcast(verdict, src=0)
    claim = RunDirClaim(out, lock, earlier if overwrite else [], created)
    if verdict.item():
        claim.abandon()
    if verdict.item() == 2.0:
        raise InputError("run directory", FileExistsError(
            f"{out} is in use by another run (it holds {out / LOCK_FILE}; last recorded holder: {holder}): wait "
            f"for it to end, or give another train.output_dir"))
    if verdict.item():
        raise InputError("run directory", FileExistsError(
            f"{out} holds an earlier run ({', '.join(earlier)}): continue it with --resume, start afresh over it "
            f"with --overwrite, or give another train.output_dir"))
    return claim


class Trainer:
    """One training run: the task, the DeepSpeed engine and the position (step, consumed samples)."""

    def __init__(self, config: Config, ds_config: dict, claim: RunDirClaim, local_rank: int = 0):
        self.config, self.ds_config = config, ds_config
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        self.accum = ds_config.get("gradient_accumulation_steps", 1)
        accelerator = get_accelerator()
        self.device = torch.device("cpu") if accelerator.device_name() == "cpu" else \
            torch.device(accelerator.device_name(), local_rank)
        self.out = Path(config.train.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        try:
            self.task = build_task(config, self.micro, self.rank, self.world, config.train.steps * self.accum,
                                   self.device)
        except (DataError, ValueError) as err:
            raise InputError("data", err) from None
        self.step = self.start_step = self.consumed = 0
        self.started = time.perf_counter()
        resume_tag = self._find_resume_tag() if config.train.resume else None
        if resume_tag is not None and checkpoint.is_universal(self.ckpt_root / resume_tag):
            self.ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        claim.take()
        self.engine = self._build_engine(init_from=resume_tag is None)
        claim.commit()
        if resume_tag is not None:
            self.resume(resume_tag)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps({"config": config.to_dict(), "ds_config": ds_config},
                                                             indent=1))
            provenance.record(self.out)
        self.run_log = RunLog(self.out, config.train.steps, self.start_step, self.task.unit, self.engine)

    def _build_engine(self, init_from: bool):
        """The DeepSpeed engine of the configured model; its weights from ``model.init_from`` if
        ``init_from`` (a fresh start) and one is given."""
        config = self.config
        ep_rank = self.rank % config.moe.ep_size
        try:
            model = build_model(config, getattr(self.task, "vocab_size", None), ep_rank=ep_rank, ds=self.ds_config)
        except HFModelError as err:  # a pretrained checkpoint that is not this model's: every rank finds it
            raise InputError("model.hf_path", err) from None
        if init_from and config.model.init_from:
            try:
                init_from_export(model, Path(config.model.init_from), ep_rank, config.moe.ep_size)
            except checkpoint.CheckpointError as err:
                raise InputError("model.init_from", err) from None
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ds_numel: ZeRO-3's whole size
        trainable = [p for p in model.parameters() if p.requires_grad]
        # AutoEP creates its expert parameters and their optimizer groups itself, inside initialize.
        param_groups = trainable if config.model.kind == "hf" else \
            split_params_into_different_moe_groups_for_optimizer({"params": trainable, "name": "parameters"})
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=self.ds_config)
        set_timeout_of_every_group(timedelta(seconds=config.train.dist_timeout_s))
        if self.rank == 0:
            log.info("model %s: %.2fM parameters; %d ranks, ep_size %d, gs_weight %g, %d steps",
                     config.model.kind, parameters / 1e6, self.world,
                     config.moe.ep_size, config.moe.gs_weight, config.train.steps)
            if config.model.kind == "hf" and not self.ds_config.get("expert_parallel", {}).get("enabled"):
                log.info("the experts are not split over ranks: DeepSpeed AutoEP has no preset for this model type, "
                         "so it trains under plain ZeRO-%d data parallelism",
                         self.ds_config.get("zero_optimization", {}).get("stage", 0))
        return engine

    def _find_resume_tag(self) -> str | None:
        try:
            tag = checkpoint.find_resume_tag(self.ckpt_root)
        except checkpoint.CheckpointError as err:
            raise InputError("checkpoint", err) from None
        if tag is None and self.rank == 0:
            log.info("no complete checkpoint under %s: starting from scratch", self.ckpt_root)
        return tag

    def resume(self, tag: str) -> None:
        """Continue from checkpoint ``tag``: weights, optimizer (same layout), step and data position."""
        try:
            state = checkpoint.resume(self.engine, self.ckpt_root, tag, self.world, self.config.moe.ep_size)
        except checkpoint.CheckpointError as err:
            raise InputError("checkpoint", err) from None
        self.step = self.start_step = state["step"]
        self.consumed = state["consumed_samples"]
        if self.rank == 0:
            log.info("resumed from %s at step %d", self.ckpt_root / checkpoint.tag_for(self.step), self.step)

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over ``accum`` micro-batches; the mean losses, as tensors (read when logged)."""
        task_loss_sum = aux_sum = torch.zeros((), device=self.device)
        for _ in range(self.accum):
            batch = self.task.train_batch(self.consumed)
            self.consumed += self.micro * self.world
            task_loss, l_aux, items = self.task.loss(self.engine, batch, self.step)
            self.engine.backward(task_loss + self.config.moe.aux_loss_weight * l_aux)
            self.engine.step()
            task_loss_sum = task_loss_sum + task_loss.detach()
            aux_sum = aux_sum + l_aux.detach()
            self.run_log.count(items)
        self.task.after_step()
        self.step += 1
        return {"task_loss": task_loss_sum / self.accum, "l_aux": aux_sum / self.accum}

    def log_step(self, losses: dict[str, torch.Tensor]) -> None:
        """Record the step's losses, the gate terms and the expert load (a collective: all ranks call it)."""
        task_loss, l_aux = losses["task_loss"].item(), losses["l_aux"].item()
        scalars = {"task_loss": task_loss, "l_aux": l_aux,
                   "loss": task_loss + self.config.moe.aux_loss_weight * l_aux,
                   "lr": self.engine.get_lr()[0], **gate_terms(self.engine.module), **self.task.routing_terms()}
        loads = gather_expert_load(self.engine.module) + self.task.expert_loads()
        self.run_log.step(self.step, scalars, loads)

    def evaluate(self, split: str, batches: int | None) -> dict[str, float]:
        self.engine.eval()
        metrics = self.task.evaluate(self.engine, split, batches)
        self.engine.train()
        self.run_log.eval(self.step, split, metrics)
        return metrics

    def save(self) -> None:
        state = {"step": self.step, "consumed_samples": self.consumed, "world_size": self.world,
                 "ep_size": self.config.moe.ep_size, "config": self.config.to_dict()}
        checkpoint.save(self.engine, self.ckpt_root, self.step, state, self.config.train.keep_last)

    def train(self) -> bool:
        """Run to ``train.steps``; False if ``train.exit_after_steps`` stopped it early (saved, resumable)."""
        train = self.config.train
        self.started = time.perf_counter()
        self.engine.train()
        while self.step < train.steps:
            losses = self.train_step()
            last = self.step == train.steps
            if self.step % train.log_interval == 0 or last:
                self.log_step(losses)
            self.run_log.advance()
            if last:
                break
            if train.eval_interval and self.step % train.eval_interval == 0:
                self.evaluate("valid", train.eval_batches)
            exiting = bool(train.exit_after_steps) and self.step - self.start_step == train.exit_after_steps
            if exiting or (train.save_interval and self.step % train.save_interval == 0):
                self.save()
            if exiting:
                if self.rank == 0:
                    print(f"exiting after {train.exit_after_steps} steps at step {self.step}; continue with --resume")
                return False
        return True

    def finish(self) -> dict[str, dict[str, float]]:
        """Evaluate the whole held-out splits, save, and write metrics.json and the loss curve."""
        self.run_log.close()
        metrics = {split: self.evaluate(split, None) for split in self.config.train.final_eval}
        if self.start_step < self.config.train.steps:
            self.save()
        if self.rank == 0:
            self._write_summary(metrics, time.perf_counter() - self.started)
        return metrics

    def _write_summary(self, metrics: dict, wall_seconds: float) -> None:
        config, moe = self.config, self.config.moe
        history = read_history(self.out / "history.jsonl")
        summary = {"steps": config.train.steps, "wall_seconds": wall_seconds, "world_size": self.world,
                   "gs_weight": moe.gs_weight, "num_experts": moe.num_experts, "top_k": moe.top_k,
                   "final_train": next((r for r in reversed(history) if "split" not in r), {}), **metrics}
        (self.out / "metrics.json").write_text(json.dumps(summary, indent=1))
        arm = "MoGE" if moe.gs_weight > 0 else "MoE"
        plot_loss_curve(history, self.out / "loss_curve.png",
                        f"{config.model.kind} {arm} E={moe.num_experts} k={moe.top_k}")
        print(f"done: {self.out}/metrics.json, {self.out}/loss_curve.png, checkpoints in {self.ckpt_root}")
        print(json.dumps(metrics))

    def close(self) -> None:
        """Close the progress bar and wait for every rank (no rank exits while another still saves)."""
        self.run_log.close()
        dist.barrier()


def main(argv: list[str] | None = None) -> dict:
    """Train; the final metrics per split ({} when stopped early by ``train.exit_after_steps``)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    claim = None
    try:
        config, ds_config, claim = setup(args)
        trainer = Trainer(config, ds_config, claim, args.local_rank)
    except BaseException as err:
        if claim is not None:
            claim.abandon()
        if not isinstance(err, InputError):
            raise
        # Before torch.distributed is up, the launcher's RANK says who reports (mpirun: all do).
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
        if err.rank_specific:
            print(f"moge_ds.train: rank {rank}: {err}", file=sys.stderr)
        elif rank == 0:
            print(f"moge_ds.train: {err}", file=sys.stderr)
        sys.exit(2)
    metrics = trainer.finish() if trainer.train() else {}
    trainer.close()
    return metrics


def is_collective_failure(err: RuntimeError) -> bool:
    """A collective that timed out or lost its peer (gloo raises these as a plain RuntimeError)."""
    return isinstance(err, dist.DistError) or any(
        sign in str(err) for sign in ("Timed out waiting", "Connection closed by peer", "Connection reset by peer"))


def cli() -> None:
    """``python -m moge_ds.train``: train, then shut every process group down (gloo aborts otherwise).

    A collective that failed (a rank died, hangs or was stopped, and ``train.dist_timeout_s``
    passed) ends this rank with one paragraph and exit status 1: the groups are broken then, and
    tearing them down could wait on the lost rank.
    """
    lifeline.die_with_launcher(f"moge_ds.train: rank {os.environ.get('RANK', '?')}")
    try:
        main()
    except checkpoint.CheckpointError as err:  # a save that failed during training
        print(f"moge_ds.train: rank {dist.get_rank()}: checkpoint error: {err}", file=sys.stderr, flush=True)
        os._exit(1)  # the other ranks may wait in the save's barrier: they end at train.dist_timeout_s
    except RuntimeError as err:
        if not is_collective_failure(err):
            raise
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
        print(f"moge_ds.train: rank {rank}: a collective failed, so another rank died, hangs or was stopped "
              f"(collectives wait at most train.dist_timeout_s): {str(err).splitlines()[0][:500]}",
              file=sys.stderr, flush=True)
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli()
