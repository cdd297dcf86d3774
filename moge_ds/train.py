"""Train a GPT or ViT with MoE/MoGE layers on DeepSpeed.

    deepspeed --num_gpus 2 -m moge_ds.train --config configs/gpt_tiny_moge.yaml \
        --deepspeed_config ds_configs/cpu.json [--set train.steps=500 moe.gs_weight=0.3] [--resume]

parse -> validate (our config x ds_config x world size) -> data -> model -> deepspeed.initialize
-> loop (sigma schedule, eval, checkpoints, logging) -> metrics.json + loss-curve PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from moge_ds import checkpoint
from moge_ds.config import ConfigError, load_config, load_ds_config, validate
from moge_ds.data.documents import DataError
from moge_ds.gate import set_sigma_step
from moge_ds.models import build_model
from moge_ds.monitor import RunLog, expert_load, gate_terms, plot_loss_curve, read_history
from moge_ds.tasks import build_task

log = logging.getLogger("moge_ds")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moge_ds.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="our preset (YAML/JSON), e.g. configs/gpt_tiny_moge.yaml")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON, e.g. ds_configs/cpu.json")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE", help="override our config")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return parser.parse_args(argv)


def exit_with_error(rank: int, kind: str, err: Exception) -> None:
    """Bad input found before training: one message (from rank 0), exit status 2, nothing written."""
    if rank == 0:
        print(f"moge_ds.train: {kind} error: {err}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    accelerator = get_accelerator()
    # Before torch.distributed is up, the launcher's RANK says who reports errors (mpirun: all do).
    rank = int(os.environ.get("RANK", 0))
    try:
        config = load_config(args.config, tuple(args.set))
        if args.resume:
            config.train.resume = True
    except ConfigError as err:
        exit_with_error(rank, "config", err)
    # mpirun starts ranks without RANK/MASTER_ADDR: DeepSpeed then discovers them through mpi4py.
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(),
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                               timeout=timedelta(seconds=config.train.dist_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        ds_config = validate(config, load_ds_config(args.deepspeed_config), world,
                             accelerator.is_bf16_supported(), bool(accelerator.is_fp16_supported()))
    except ConfigError as err:
        exit_with_error(rank, "config", err)
    train, moe = config.train, config.moe
    out = Path(train.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"config": config.to_dict(), "ds_config": ds_config}, indent=1))
    device = torch.device(accelerator.device_name(), args.local_rank) if accelerator.device_name() != "cpu" \
        else torch.device("cpu")
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config.get("gradient_accumulation_steps", 1)

    try:
        task = build_task(config, micro, rank, world, train.steps * accum, device)
    except (DataError, ValueError) as err:
        exit_with_error(rank, "data", err)
    model = build_model(config, getattr(task, "vocab_size", None), ep_rank=rank % moe.ep_size)
    param_groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in model.parameters() if p.requires_grad], "name": "parameters"})
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config)

    start_step = consumed = 0
    ckpt_root = out / "checkpoints"
    if train.resume:
        try:
            state = checkpoint.resume(engine, ckpt_root, world, moe.ep_size)
        except checkpoint.CheckpointError as err:
            exit_with_error(rank, "checkpoint", err)
        if state is not None:
            start_step, consumed = state["step"], state["consumed_samples"]
            if rank == 0:
                log.info("resumed from %s at step %d", ckpt_root / checkpoint.tag_for(start_step), start_step)
        elif rank == 0:
            log.info("no complete checkpoint under %s: starting from scratch", ckpt_root)

    run_log = RunLog(out, train.steps, start_step, task.unit, engine)
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.2fM parameters on this rank; %d ranks, ep_size %d, gs_weight %g, %d steps",
                 config.model.kind, n_params / 1e6, world, moe.ep_size, moe.gs_weight, train.steps)

    def evaluate(step: int, split: str, batches: int | None = train.eval_batches) -> dict[str, float]:
        engine.eval()
        metrics = task.evaluate(engine, split, batches)
        engine.train()
        run_log.eval(step, split, metrics)
        return metrics

    def save(step: int) -> None:
        state = {"step": step, "consumed_samples": consumed, "world_size": world, "ep_size": moe.ep_size,
                 "config": config.to_dict()}
        checkpoint.save(engine, ckpt_root, step, state, train.keep_last)

    started = time.perf_counter()
    engine.train()
    for step in range(start_step, train.steps):
        set_sigma_step(engine.module, step)
        # Summed as tensors; read (a device sync) only when logging.
        task_loss_sum = aux_sum = torch.zeros((), device=device)
        for _ in range(accum):
            batch = task.train_batch(consumed)
            consumed += micro * world
            task_loss, l_aux, items = task.loss(engine, batch)
            loss = task_loss + moe.aux_loss_weight * l_aux
            engine.backward(loss)
            engine.step()
            task_loss_sum = task_loss_sum + task_loss.detach()
            aux_sum = aux_sum + l_aux.detach()
            run_log.count(items)
        done = step + 1
        if done % train.log_interval == 0 or done == train.steps:
            task_loss_mean, aux_mean = task_loss_sum.item() / accum, aux_sum.item() / accum
            scalars = {"task_loss": task_loss_mean, "l_aux": aux_mean,
                       "loss": task_loss_mean + moe.aux_loss_weight * aux_mean,
                       "lr": engine.get_lr()[0], **gate_terms(engine.module)}
            run_log.step(done, scalars, expert_load(engine.module))
        run_log.advance()
        if train.eval_interval and done % train.eval_interval == 0 and done != train.steps:
            evaluate(done, "valid")
        exiting = train.exit_after_steps and done - start_step == train.exit_after_steps and done != train.steps
        if exiting or (train.save_interval and done % train.save_interval == 0 and done != train.steps):
            save(done)
        if exiting:
            run_log.close()
            if rank == 0:
                print(f"exiting after {train.exit_after_steps} steps at step {done}; continue with --resume")
            return {}
    run_log.close()

    # The final numbers cover the whole held-out splits.
    metrics = {split: evaluate(train.steps, split, None) for split in train.final_eval}
    if start_step < train.steps:
        save(train.steps)
    if rank == 0:
        history = read_history(out / "history.jsonl")
        summary = {"steps": train.steps, "wall_seconds": time.perf_counter() - started, "world_size": world,
                   "gs_weight": moe.gs_weight, "num_experts": moe.num_experts, "top_k": moe.top_k,
                   "final_train": next((r for r in reversed(history) if "split" not in r), {}), **metrics}
        (out / "metrics.json").write_text(json.dumps(summary, indent=1))
        plot_loss_curve(history, out / "loss_curve.png",
                        f"{config.model.kind} {'MoGE' if moe.gs_weight > 0 else 'MoE'} E={moe.num_experts} "
                        f"k={moe.top_k}")
        print(f"done: {out}/metrics.json, {out}/loss_curve.png, checkpoints in {ckpt_root}")
        print(json.dumps(metrics))
    dist.barrier()
    return metrics


def cli() -> None:
    """``python -m moge_ds.train``: train, then shut the process group down cleanly (gloo aborts otherwise)."""
    main()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli()
