"""Upcycle a dense model into a mixture of experts, exact at step 0.

    python -m moge_ds.upcycle SRC --out DIR --num-experts 8 --top-k 2 \\
        [--router-init zeros|normal --router-std S --seed N --noise S --dtype auto|float32|bfloat16|float16]
        [--placement all|every_other|last_2]   (our GPT only)

SRC is either a local dense Hugging Face model directory (config.json + safetensors): Llama and
Mistral become Mixtral, Qwen3 becomes Qwen3-MoE, Qwen2 becomes Qwen2-MoE (``upcycle/hf.py``,
streamed one layer at a time); or an export of our dense GPT (``moge_ds.export``), which becomes
an export of our GPT with MoE/MoGE blocks that ``model.init_from=DIR`` trains (``upcycle/gpt.py``).

Every expert starts as an exact copy of the dense MLP and a new router sits in front (zeros by
default: all experts score equal; ``normal``: N(0, router std), seeded). The top-k weights sum to
1, so with exact copies the upcycled model computes the dense one whatever the router picks.
``--noise S`` adds ``S * std(W) * N(0, 1)`` to each copy of each weight ``W`` (seeded), which
breaks that exactness by an amount linear in S.

DIR must not exist; it is written into a hidden sibling and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from moge_ds.checkpoint import CheckpointError
from moge_ds.upcycle.common import DTYPES, Options, UpcycleError, check_options
from moge_ds.upcycle.gpt import is_export, upcycle_gpt
from moge_ds.upcycle.hf import INDEX_FILE, expected_names, tensor_files, upcycle_hf

__all__ = ["INDEX_FILE", "Options", "UpcycleError", "expected_names", "main", "tensor_files", "upcycle"]


def upcycle(src: Path, out: Path, opts: Options) -> Path:
    """Write the MoE model of the dense model in ``src`` (ours or Hugging Face's) to the new directory ``out``."""
    check_options(opts, out)
    if is_export(src):
        return upcycle_gpt(src, out, opts)
    return upcycle_hf(src, out, opts)


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m moge_ds.upcycle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="a dense Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3) "
                                               "or an export of our dense GPT")
    parser.add_argument("--out", type=Path, required=True, help="the new MoE model directory (must not exist)")
    parser.add_argument("--num-experts", type=int, required=True)
    parser.add_argument("--top-k", type=int, required=True)
    parser.add_argument("--router-init", choices=("zeros", "normal"), default="zeros")
    parser.add_argument("--router-std", type=float, default=None,
                        help="default: the source's initialisation std (config initializer_range; ours 0.02)")
    parser.add_argument("--seed", type=int, default=0, help="for --router-init normal and --noise")
    parser.add_argument("--noise", type=float, default=0.0, help="relative to each weight's std; 0: exact copies")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: as stored in SRC")
    parser.add_argument("--placement", choices=("all", "every_other", "last_2"), default=None,
                        help="our GPT only: the blocks that get experts (default all)")
    return parser, parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    parser, args = parse_args(argv)
    opts = Options(args.num_experts, args.top_k, args.router_init, args.router_std, args.seed, args.noise, args.dtype,
                   args.placement)
    try:
        out = upcycle(args.src, args.out, opts)
    except (UpcycleError, CheckpointError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {out}: {opts.num_experts} experts, top-{opts.top_k}", file=sys.stderr)
