"""One MoE shape through three implementations, side by side in one process, and MoGE's cost on AutoEP.

    python -m bench.bench_autoep [--quick] [--out bench/results]

The shape: hidden 512, SwiGLU experts with FFN 2048, top-2, T = 8192 tokens, E in {16, 64}.

1. DeepSpeed's native ``MoE`` layer (GShard dense dispatch, capacity factor 1.0 and 2.0) with a
   SwiGLU expert: what the gpt/vit models use.
2. DeepSpeed AutoEP's ``AutoEPMoELayer`` (grouped GEMM, dropless): what ``model.kind hf`` trains,
   taken from a 1-layer Hugging Face Mixtral after ``deepspeed.initialize`` replaced its MoE block.
3. That Mixtral's own ``MixtralSparseMoeBlock`` (a loop over experts), before replacement.

Each is timed fwd+bwd in alternation after warm-up (medians). Activation memory is the bytes of
the tensors autograd saves for backward during one forward (``saved_tensors_hooks``, weights
left out): what a layer holds until its backward, measured the same way on any device. MoGE's
cost on the AutoEP path is the group-sparsity term on the ``[T, E]`` router logits (fp32 softmax,
pooling, backward), timed beside the layer.
One process, world size 1, ``autoep_size`` 1: no all-to-all, as with the native layer's ep_size 1.
Writes ``<out>/autoep.json`` and ``<out>/autoep.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE

from bench.bench_gate import DEVICE, interleaved
from bench.environment import describe_machine
from moge_ds.config import MoEConfig
from moge_ds.distributed import single_process_group
from moge_ds.hf.loss import router_group_sparsity


class SwiGLU(torch.nn.Module):
    """Mixtral's expert: ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.w1 = torch.nn.Linear(hidden, ffn, bias=False)
        self.w3 = torch.nn.Linear(hidden, ffn, bias=False)
        self.w2 = torch.nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def mixtral_blocks(hidden: int, ffn: int, experts: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(hf_block, autoep_layer)``: a 1-layer Mixtral's MoE block before and after AutoEP (fp32)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=hidden, intermediate_size=ffn,
                                             num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                                             num_local_experts=experts, num_experts_per_tok=2))
    hf_block = model.model.layers[0].mlp
    ds = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
          "zero_optimization": {"stage": 0},
          "expert_parallel": {"enabled": True, "autoep_size": 1, "preset_model": "mixtral"}}
    engine, *_ = deepspeed.initialize(model=copy.deepcopy(model), model_parameters=None, config=ds)
    return hf_block.to(DEVICE), engine.module.model.layers[0].mlp.to(DEVICE)


def saved_bytes(step, layer: torch.nn.Module) -> int:
    """Bytes of activations autograd saves for backward during ``step``'s forward, each storage
    counted once; the layer's weights (saved by every matmul) are not activations and are left out."""
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(seen.values())


def fwd_bwd(layer, x):
    def run():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.square().mean().backward()

    def forward_only():
        out = layer(x)
        return out[0] if isinstance(out, tuple) else out

    return run, forward_only


def bench_shape(experts: int, tokens: int, hidden: int, ffn: int, reps: int) -> dict:
    hf_block, autoep = mixtral_blocks(hidden, ffn, experts)
    variants = {"autoep": autoep, "hf_block": hf_block}
    for factor in (1.0, 2.0):
        variants[f"native_cf{factor:g}"] = MoE(hidden, SwiGLU(hidden, ffn), num_experts=experts, ep_size=1, k=2,
                                               capacity_factor=factor, eval_capacity_factor=factor,
                                               min_capacity=4).to(DEVICE)
    x = torch.randn(1, tokens, hidden, device=DEVICE, requires_grad=True)
    logits = torch.randn(tokens, experts, device=DEVICE, requires_grad=True)
    moe = MoEConfig(num_experts=experts, padding="circular", gs_weight=1.0)

    def moge_term():
        logits.grad = None
        router_group_sparsity([logits], moe, sigma=1.0).backward()

    steps = {name: fwd_bwd(layer, x)[0] for name, layer in variants.items()}
    times = interleaved({**steps, "moge_term": moge_term}, reps, warmup=1)
    memory = {name: saved_bytes(fwd_bwd(layer, x)[1], layer) for name, layer in variants.items()}
    row = {"E": experts, "T": tokens, "k": 2, "hidden": hidden, "ffn": ffn, "seconds": times,
           "saved_bytes": memory, "moge_share_of_autoep": times["moge_term"] / times["autoep"]}
    print(f"E={experts}: " + ", ".join(f"{n} {t * 1e3:.0f} ms" for n, t in times.items()) +
          f"; MoGE term {row['moge_share_of_autoep']:.2%} of the AutoEP layer", flush=True)
    return row


def markdown(result: dict) -> str:
    m = result["machine"]
    names = ["autoep", "native_cf1", "native_cf2", "hf_block"]
    lines = [f"# Native MoE vs AutoEP ({m['device']}, torch {m['torch']}, DeepSpeed {m['deepspeed']}, "
             f"{m['threads']} threads)", "", f"Command: `{result['command']}`", "",
             "fwd+bwd median ms (ratio to AutoEP) and activation memory saved for backward (MiB).", "",
             "| E | T | " + " | ".join(f"{n} ms" for n in names) + " | " +
             " | ".join(f"{n} MiB" for n in names) + " | MoGE term ms | MoGE / AutoEP |",
             "|---" * (2 + 2 * len(names) + 2) + "|"]
    for r in result["rows"]:
        t, mem = r["seconds"], r["saved_bytes"]
        cells = [f"{t[n] * 1e3:.0f} ({t[n] / t['autoep']:.2f}x)" for n in names]
        cells += [f"{mem[n] / 2**20:.0f}" for n in names]
        lines.append(f"| {r['E']} | {r['T']} | " + " | ".join(cells) +
                     f" | {t['moge_term'] * 1e3:.2f} | {r['moge_share_of_autoep']:.2%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T=1024, E=16, for a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    experts, tokens = ([16], 1024) if args.quick else ([16, 64], 8192)
    os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize asks for it; no launcher here
    with single_process_group():
        rows = [bench_shape(e, tokens, 512, 2048, args.reps) for e in experts]
    result = {"machine": describe_machine(), "rows": rows,
              "command": "python -m bench.bench_autoep" + (" --quick" if args.quick else "")}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "autoep_quick" if args.quick else "autoep"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}.md").write_text(markdown(result))
    print(f"wrote {args.out / name}.md")


if __name__ == "__main__":
    main()
