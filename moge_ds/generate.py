"""Sample text from an exported GPT: prompt in, text out.

    python -m moge_ds.generate runs/gpt_tiny/export --prompt "The list type" [--tokens 100]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from moge_ds.checkpoint import CheckpointError
from moge_ds.config import ConfigError
from moge_ds.data.documents import DataError
from moge_ds.data.tokenizer import load_tokenizer
from moge_ds.export import load_export


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, context: int,
             temperature: float = 0.8, top_k: int | None = 50, eod: int | None = None,
             generator: torch.Generator | None = None) -> list[int]:
    """Continue ``prompt_ids`` by sampling; the model sees at most the last ``context`` tokens."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-context:]])
        logits = model(window)[0][0, -1].float()
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        if next_id == eod:
            break
        ids.append(next_id)
    return ids


def check_options(args: argparse.Namespace) -> None:
    """Refuse options that generate nothing or sample from a wrong distribution, before loading the model."""
    if not args.prompt:
        raise ConfigError("--prompt is empty: give the text to continue (at least one character)")
    if args.tokens < 1:
        raise ConfigError(f"--tokens must be >= 1 (tokens to generate), got {args.tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 1, or 0 to sample from the whole vocabulary, got {args.top_k}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moge_ds.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokens", type=int, default=100, help="tokens to generate (>= 1)")
    parser.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0: greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0: all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        check_options(args)
        model, config = load_export(args.export)
        if config.model.kind != "gpt":
            parser.exit(2, f"error: {args.export} holds a {config.model.kind} model; generation needs a gpt\n")
        tokenizer = load_tokenizer(config.data.tokenizer)
    except (CheckpointError, ConfigError, DataError) as err:
        parser.exit(2, f"error: {err}\n")
    prompt_ids = tokenizer.tokenize(args.prompt)
    if not prompt_ids:
        parser.exit(2, f"error: --prompt {args.prompt!r} is no tokens to {tokenizer.path}: give text it encodes\n")
    # DeepSpeed samples the 2nd expert with the global RNG: seed it too, for repeatable output.
    torch.manual_seed(args.seed)
    ids = generate(model, prompt_ids, args.tokens, config.model.seq_length, args.temperature,
                   args.top_k, tokenizer.eod, torch.Generator().manual_seed(args.seed))
    print(tokenizer.detokenize(ids))


if __name__ == "__main__":
    main()
