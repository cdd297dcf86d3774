"""Run by the deepspeed launcher from tests/test_distributed.py: a tiny MoGE model, ep_size 2.

For each ZeRO stage asked for: trains 20 steps, checks experts differ across ranks while
everything else stays in sync, saves a checkpoint and loads it back. Stage 3 is expected to
be refused by DeepSpeed; the refusal is recorded. Writes <out>/rank<R>.json.
"""

import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

from moge_ds.distributed import init_job, shutdown
from moge_ds.layer import MoGE


class TinyMoGE(torch.nn.Module):

    def __init__(self, dim=16, num_experts=4):
        super().__init__()
        self.inp = torch.nn.Linear(dim, dim)
        expert = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        self.moe = MoGE(dim, expert, num_experts=num_experts, ep_size=2, k=2, gs_weight=0.1, map_shape=(2, 2),
                        padding="circular", reduction="mean", min_capacity=4, capacity_factor=2.0)
        self.out = torch.nn.Linear(dim, 4)

    def forward(self, x):
        h, l_aux, _ = self.moe(torch.relu(self.inp(x)))
        return self.out(h), l_aux


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--zero", type=int, nargs="+", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_job()
    rank = dist.get_rank()
    results = {stage: train_save_load(stage, rank, f"{args.out}/zero{stage}") for stage in args.zero}
    json.dump(results, open(f"{args.out}/rank{rank}.json", "w"))
    shutdown()


def train_save_load(stage, rank, ckpt_dir):
    torch.manual_seed(0)  # same non-expert init everywhere; expert init is seeded per rank below
    model = TinyMoGE()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(100 + rank)
        for p in model.parameters():
            if is_moe_param(p):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "Adam", "params": {"lr": 3e-3, "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "steps_per_print": 1000}
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "params"})
    try:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    except AssertionError as err:  # DeepSpeed's own refusal, e.g. native MoE under ZeRO-3
        return {"init_error": str(err)}
    gen = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(64, 16, generator=gen)
    y = x[:, :4].argmax(-1)
    losses = []
    for step in range(20):
        idx = torch.arange(step * 8, step * 8 + 8) % 64
        logits, l_aux = engine(x[idx])
        loss = torch.nn.functional.cross_entropy(logits, y[idx]) + 0.01 * l_aux
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    def flat(pred):
        return torch.cat([p.detach().flatten() for p in engine.module.parameters() if pred(p)])

    expert, dense = flat(is_moe_param), flat(lambda p: not is_moe_param(p))
    experts_all, dense_all = [torch.zeros_like(expert) for _ in range(2)], [torch.zeros_like(dense) for _ in range(2)]
    dist.all_gather(experts_all, expert)
    dist.all_gather(dense_all, dense)
    engine.save_checkpoint(ckpt_dir, tag="step20")
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    engine.load_checkpoint(ckpt_dir, tag="step20")
    restored = all(torch.equal(before[n], p.detach()) for n, p in engine.module.named_parameters())
    return {"losses": losses, "experts_differ": not torch.equal(*experts_all),
            "dense_in_sync": torch.equal(*dense_all), "restored": restored,
            "gs_loss": engine.module.moe.gate.last_group_sparsity_loss.item()}

if __name__ == "__main__":
    main()
