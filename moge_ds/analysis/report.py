"""Analyse an exported model and write a report (Markdown + PNGs + JSON).

    python -m moge_ds.analysis runs/vit_fmnist/export --out runs/vit_fmnist/analysis [--probe 2000]

Per MoE layer: expert load (share per expert, CV, dropped routes), topographic activation maps
(overall and per class / token type), expert diversity (cosine of weights and of outputs on the
probe), specialisation (routing entropy; mutual information between the top-1 expert and the
class or token type), how often top-2 experts are map neighbours, and, for images, routing
invariance (Jaccard of top-k sets) under 1-2 pixel shifts and small rotations.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from deepspeed.moe.sharded_moe import MOELayer

from moge_ds.analysis.metrics import (expert_load, map_neighbour_rate, mean_offdiagonal_cosine, mutual_information,
                                      routing_entropy, topk_jaccard)
from moge_ds.analysis.routing import LayerRouting, capture_routing
from moge_ds.analysis.topography import MapGeometry, topography
from moge_ds.checkpoint import CheckpointError
from moge_ds.config import tokens_per_sample
from moge_ds.data.documents import DataError
from moge_ds.data.images import normalize, rotate, shift
from moge_ds.distributed import single_process_group
from moge_ds.export import load_export
from moge_ds.hf.families import family
from moge_ds.hf.routers import is_hf_model, moe_blocks
from moge_ds.topographic import default_map_shape

TOKEN_TYPES = ("word start", "word piece", "digit", "punctuation", "whitespace")
IMAGE_TRANSFORMS = {"shift 1px": lambda x: shift(x, 0, 1), "shift 2px": lambda x: shift(x, 2, 0),
                    "rotate +10deg": lambda x: rotate(x, 10.0), "rotate -10deg": lambda x: rotate(x, -10.0)}


def _token_type(piece: str) -> int:
    body = piece.lstrip("\u2581")
    if not body.strip():
        return 4
    if body[0].isdigit():
        return 2
    if not body[0].isalnum():
        return 3
    return 0 if piece.startswith("\u2581") else 1


def _chunks(x: torch.Tensor, size: int):
    return [x[i:i + size] for i in range(0, len(x), size)]


def _image_probe(config, size: int):
    from moge_ds.tasks import load_images

    test = load_images(config.data.images, "test")
    images, labels = test.images[:size], test.labels[:size]
    return images, labels.repeat_interleave(tokens_per_sample(config.model)), list(test.classes)


def _text_probe(config, size: int):
    from moge_ds.tasks import LanguageModelling

    task = LanguageModelling(config, micro_batch=8, rank=0, world=1, total_micro_batches=1,
                             device=torch.device("cpu"))
    batches = max(1, size // (8 * config.model.seq_length))
    tokens = torch.cat([task.batch(task.splits.test, b * 8)["tokens"] for b in range(batches)])
    kinds = torch.tensor([_token_type(p) for p in task.tokenizer.pieces()])
    return tokens, kinds[tokens.flatten()], list(TOKEN_TYPES)


def probe_inputs(config, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Probe inputs from the test split (raw images, or token ids), a label per token, the label names."""
    return _image_probe(config, size) if config.model.kind == "vit" else _text_probe(config, size)


def model_batches(config, inputs: torch.Tensor) -> list[torch.Tensor]:
    """``inputs`` from :func:`probe_inputs` cut into model-ready batches."""
    if config.model.kind == "vit":
        return [normalize(chunk) for chunk in _chunks(inputs, 100)]
    return _chunks(inputs, 8)


def _maps(routing: list[LayerRouting], labels: torch.Tensor, names: list[str], map_shape, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["all"] + names
    fig, axes = plt.subplots(len(routing), len(columns), figsize=(1.7 * len(columns), 1.9 * len(routing)),
                             squeeze=False)
    for row, layer in enumerate(routing):
        for col, name in enumerate(columns):
            chosen = layer.scores if col == 0 else layer.scores[labels == col - 1]
            axis = axes[row][col]
            if len(chosen):
                axis.imshow(chosen.mean(0).view(*map_shape).numpy(), cmap="viridis")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=7)
            if col == 0:
                axis.set_ylabel(f"MoE layer {row}", fontsize=8)
    fig.suptitle("mean routing score per expert on the topographic map")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _similarity_plot(matrices: list[torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices), 3), squeeze=False)
    for i, m in enumerate(matrices):
        image = axes[0][i].imshow(m.numpy(), vmin=-1, vmax=1, cmap="coolwarm")
        axes[0][i].set_title(f"layer {i}: expert output cosine", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Expert:
    """One expert of a MoE layer as a function of its tokens ``[N, d] -> [N, d]``, with its weights as one
    vector: a DeepSpeed expert module, or expert ``index`` of a Hugging Face fused experts module (every
    parameter ``[E, ...]``; called as HF's MoE block calls it, with each token routed to it at weight 1)."""

    def __init__(self, module: torch.nn.Module, index: int | None = None):
        self.module, self.index = module, index

    def weights(self) -> torch.Tensor:
        params = self.module.parameters()
        return torch.cat([(p if self.index is None else p[self.index]).flatten() for p in params])

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return self.module(tokens)
        route = torch.full((len(tokens), 1), self.index, dtype=torch.long)
        return self.module(tokens, route, torch.ones(len(tokens), 1, dtype=tokens.dtype))


def expert_functions(model: torch.nn.Module) -> list[list[Expert]]:
    """Each MoE layer's experts, in the order :func:`capture_routing` reports the layers."""
    if not is_hf_model(model):
        return [[Expert(e) for e in m.experts.deepspeed_experts] for m in model.modules() if isinstance(m, MOELayer)]
    fam = family(model.config)
    return [[Expert(block.experts, e) for e in range(fam.num_experts)] for block in moe_blocks(model, fam)]


@torch.no_grad()
def analyse(export_dir: Path, out: Path, probe: int = 2000, seed: int = 0) -> dict:
    model, config = load_export(export_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # DeepSpeed's 2nd-expert sampling draws from the global RNG
    inputs, labels, names = probe_inputs(config, probe)
    routing = capture_routing(model, model_batches(config, inputs))
    num_experts = config.moe.num_experts
    map_shape = tuple(config.moe.map_shape) if config.moe.map_shape else default_map_shape(num_experts)
    geometry = MapGeometry(map_shape, config.moe.window_size, config.moe.stride, config.moe.padding,
                           config.moe.sigma_min)
    layers, output_sims = [], []
    for index, (layer, experts) in enumerate(zip(routing, expert_functions(model))):
        sample = layer.inputs[torch.randperm(len(layer.inputs))[:512]]
        weights = torch.stack([expert.weights() for expert in experts])
        outputs = torch.stack([expert(sample).flatten() for expert in experts])
        weight_cos, _ = mean_offdiagonal_cosine(weights)
        output_cos, output_sim = mean_offdiagonal_cosine(outputs)
        output_sims.append(output_sim)
        entropy = routing_entropy(layer.scores)
        stats = {"layer": index, **expert_load(layer.topk, layer.dropped, num_experts),
                 "expert_weight_cosine": weight_cos, "expert_output_cosine": output_cos,
                 "routing_entropy_nats": entropy.mean().item(),
                 "routing_entropy_normalized": (entropy.mean() / math.log(num_experts)).item(),
                 "mi_top1_vs_label": mutual_information(layer.topk[:, 0], labels),
                 "top2_map_neighbour_rate": map_neighbour_rate(layer.topk, map_shape),
                 "topography": topography(layer.scores, geometry, config.moe.top_k)}
        layers.append(stats)
    invariance = {}
    if config.model.kind == "vit":
        for name, transform in IMAGE_TRANSFORMS.items():
            torch.manual_seed(seed)
            moved = capture_routing(model, model_batches(config, transform(inputs)))
            invariance[name] = [topk_jaccard(a.topk, b.topk).mean().item() for a, b in zip(routing, moved)]
    _maps(routing, labels, names, map_shape, out / "topographic_maps.png")
    _similarity_plot(output_sims, out / "expert_similarity.png")
    result = {"export": str(export_dir), "kind": config.model.kind, "num_experts": num_experts,
              "top_k": config.moe.top_k, "gs_weight": config.moe.gs_weight, "map_shape": list(map_shape),
              "probe_tokens": len(labels), "layers": layers, "invariance_jaccard": invariance}
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(_markdown(result))
    return result


def _markdown(result: dict) -> str:
    kind = "MoGE" if result["gs_weight"] > 0 else "MoE"
    lines = [f"# Expert analysis: {result['kind']} {kind}, E={result['num_experts']}, k={result['top_k']}", "",
             f"Export `{result['export']}`, {result['probe_tokens']} probe tokens, map {result['map_shape']}.", "",
             "| layer | load CV | dropped | weight cos | output cos | entropy (norm.) | MI(top-1; label) bits "
             "(norm.) | top-2 neighbours |", "|---|---|---|---|---|---|---|---|"]
    for s in result["layers"]:
        mi = s["mi_top1_vs_label"]
        lines.append(f"| {s['layer']} | {s['cv']:.3f} | {s['dropped_rate']:.3f} | {s['expert_weight_cosine']:.3f} | "
                     f"{s['expert_output_cosine']:.3f} | {s['routing_entropy_normalized']:.3f} | "
                     f"{mi['mi_bits']:.3f} ({mi['normalized']:.3f}) | {s['top2_map_neighbour_rate']:.3f} |")
    lines += ["", "Topography of the noise-free scores (not the routed experts): top-2 map neighbours vs chance, "
              "map smoothness (neighbour minus non-neighbour score correlation), border bias (load vs window "
              "coverage), and the group-sparsity loss at sigma_min vs a uniform router.", "",
              "| layer | top-2 neighbours | chance | smoothness | border bias | entropy (norm.) | GS loss | "
              "GS loss uniform |", "|---|---|---|---|---|---|---|---|"]
    for s in result["layers"]:
        t = s["topography"]
        lines.append(f"| {s['layer']} | {t['top2_neighbour_rate']:.3f} | {t['top2_neighbour_chance']:.3f} | "
                     f"{t['map_smoothness']:+.3f} | {t['border_bias']:+.3f} | {t['entropy_normalized']:.3f} | "
                     f"{t['group_sparsity_loss']:.4f} | {t['group_sparsity_loss_uniform']:.4f} |")
    if result["invariance_jaccard"]:
        lines += ["", "Routing invariance: mean Jaccard of each token's top-k experts, original vs transformed "
                  "(1 = unchanged).", "", "| transform | " + " | ".join(
                      f"layer {i}" for i in range(len(result["layers"]))) + " |",
                  "|---|" + "---|" * len(result["layers"])]
        for name, values in result["invariance_jaccard"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += ["", "![topographic maps](topographic_maps.png)", "", "![expert similarity](expert_similarity.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moge_ds.analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="an export directory (python -m moge_ds.export)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--probe", type=int, default=2000, help="probe images (ViT) or about this many tokens (LM)")
    args = parser.parse_args(argv)
    try:
        with single_process_group():
            analyse(args.export, args.out, args.probe)
    except (CheckpointError, DataError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {args.out / 'report.md'}")
