"""Run by the deepspeed launcher from tests/test_checkpoint.py: load a checkpoint into this launch's
layout (world size, ep_size), write the model's outputs on a fixed batch, then train one step."""

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from moge_ds import checkpoint
from moge_ds.config import load_config, load_ds_config, validate
from moge_ds.distributed import init_job, shutdown
from moge_ds.models import build_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--ds", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", nargs="*", default=[])
    args = parser.parse_args()
    init_job()
    rank, world = dist.get_rank(), dist.get_world_size()
    config = load_config(None, tuple(args.set))
    ds = validate(config, load_ds_config(args.ds), world)
    model = build_model(config, config.model.vocab_size, ep_rank=rank % config.moe.ep_size)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    state = checkpoint.resume(engine, args.checkpoints, checkpoint.find_resume_tag(args.checkpoints), world,
                              config.moe.ep_size)
    engine.eval()
    tokens = torch.randint(0, config.model.vocab_size, (4, config.model.seq_length),
                           generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        logits, _ = engine(tokens)
    engine.train()
    logits_train, l_aux = engine(tokens)
    loss = torch.nn.functional.cross_entropy(logits_train.flatten(0, 1), tokens.flatten()) + 0.01 * l_aux
    engine.backward(loss)
    engine.step()
    if rank == 0:
        torch.save(logits, args.out / "logits.pt")
        (args.out / "result.json").write_text(json.dumps({"step": state["step"], "loss_after": loss.item()}))
    shutdown()


if __name__ == "__main__":
    main()
