"""Upcycle a dense Hugging Face causal LM into a mixture of experts, exact at step 0.

Llama and Mistral become Mixtral, Qwen3 becomes Qwen3-MoE, Qwen2 becomes Qwen2-MoE (its shared
expert all zeros: it adds exactly 0). Every expert starts as an exact copy of the dense MLP and a new router sits in
front (zeros by default: all experts score equal). The top-k weights are renormalised to sum to 1,
so with exact copies the MoE computes the dense MLP whatever the router picks: the upcycled model's
logits equal the dense model's. ``--noise S`` breaks that exactness: on the tests' tiny fp32 Llama,
S=1e-3 moves the logits by about 4e-5 of their largest value, S=1e-2 by about 4e-4 (linear in S).

The output holds config.json, one safetensors shard per decoder layer (plus one for the rest) with
model.safetensors.index.json, and SRC's generation config and tokenizer files. It loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` and trains under ``model.kind: hf`` with
``hf_init: pretrained``. The source is read lazily and the output written one layer at a time,
so peak memory is about one upcycled layer, not the model.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from moge_ds.checkpoint import staged_dir
from moge_ds.upcycle.common import Options, Upcycler, UpcycleError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Copied from SRC when present: what a user needs beside the weights to generate text.
SIDE_FILES = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
              "merges.txt", "chat_template.*")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_DENSE_MLP = re.compile(r"^(model\.layers\.\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class Target:
    """Where a dense MLP goes in one MoE format: ``<layer>.<block>.experts.<e>.<name>.weight`` for
    each of the dense ``gate_proj``/``up_proj``/``down_proj``, the router at ``<layer>.<block>.gate``."""

    model_type: str
    block: str
    expert_names: dict[str, str]
    # Qwen2-MoE always builds a shared expert. Ours has intermediate size 1 and all-zero weights: it
    # adds exactly 0, and every gradient through it is 0, so it stays so. (Size 0 would be simpler,
    # but ZeRO-3 never gathers a zero-element parameter: its forward fails.)
    zero_shared_expert: bool = False


_MIXTRAL = Target("mixtral", "block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})
_SAME_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
# Dense model_type -> its MoE format. The names are those transformers 5.15.1's save_pretrained writes
# (per-expert tensors, as on the hub); from_pretrained fuses them into gate_up_proj / down_proj itself.
TARGETS = {
    "llama": _MIXTRAL,
    "mistral": _MIXTRAL,
    "qwen3": Target("qwen3_moe", "mlp", _SAME_NAMES),
    "qwen2": Target("qwen2_moe", "mlp", _SAME_NAMES, zero_shared_expert=True),
}
# Config keys of the dense models that their MoE formats do not have (or must not inherit).
_DENSE_ONLY = ("model_type", "architectures", "transformers_version", "_name_or_path", "mlp_bias", "pretraining_tp",
               "layer_types", "max_window_layers", "use_sliding_window")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


def source_target(src: Path) -> Target:
    """The MoE format for SRC's config.json; refused unless it is a supported dense model (read as
    plain JSON: an unknown or MoE model_type is refused before transformers is imported)."""
    try:
        raw = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise UpcycleError(f"{src} has no config.json: give a Hugging Face model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UpcycleError(f"{src / 'config.json'} is not valid JSON: {err}") from None
    model_type = raw.get("model_type")
    moe_keys = [key for key in _MOE_KEYS if raw.get(key)]
    if moe_keys or model_type in {t.model_type for t in TARGETS.values()}:
        raise UpcycleError(f"{src} is already a mixture of experts (model_type {model_type!r}, {moe_keys}): "
                           f"upcycling takes a dense model")
    if model_type not in TARGETS:
        raise UpcycleError(f"model_type {model_type!r} of {src} is not supported: supported dense sources are "
                           + ", ".join(f"{k} -> {t.model_type}" for k, t in TARGETS.items()))
    return TARGETS[model_type]


def dense_config(src: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src, local_files_only=True)
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise UpcycleError(f"transformers cannot read {src / 'config.json'}: {err}") from None


def check_dense_features(config, target: Target) -> None:
    """Refuse what the MoE format cannot represent exactly (the upcycled model would compute something else)."""
    if getattr(config, "attention_bias", False) and target.model_type == "mixtral":
        raise UpcycleError(f"{config.model_type} with attention_bias=True: Mixtral's attention has no biases")
    if getattr(config, "mlp_bias", False):
        raise UpcycleError(f"{config.model_type} with mlp_bias=True: the MoE experts have no biases")
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    if sliding and target.model_type == "qwen3_moe":
        # Qwen3 slides only in layer_types' sliding layers; Qwen3-MoE slides in every layer or none.
        raise UpcycleError("qwen3 with sliding-window layers (use_sliding_window=true): Qwen3-MoE cannot "
                           "represent per-layer sliding windows; upcycle a model without them")


def target_config(config, target: Target, opts: Options):
    """The MoE config: the dense one's shapes, E experts of the dense intermediate size, top-k
    weights renormalised to sum to 1, no shared expert, the target's default aux-loss coefficient."""
    from transformers import AutoConfig

    values = {k: v for k, v in config.to_dict().items() if k not in _DENSE_ONLY}
    values.update(num_experts=opts.num_experts, num_experts_per_tok=opts.top_k, output_router_logits=False)
    if opts.dtype != "auto":
        values["dtype"] = opts.dtype
    if target.model_type == "mixtral":  # Mixtral always renormalises its top-k
        values.pop("attention_bias", None)  # False (check_dense_features): Mixtral has no such setting
        values["router_jitter_noise"] = 0.0
    else:
        values.update(moe_intermediate_size=config.intermediate_size, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[])
    if target.model_type == "qwen3_moe":
        values["sliding_window"] = None  # no source layer slides (check_dense_features)
    if target.zero_shared_expert:
        values.update(shared_expert_intermediate_size=1, qkv_bias=True, layer_types=config.layer_types,
                      use_sliding_window=config.use_sliding_window, max_window_layers=config.max_window_layers)
    moe = AutoConfig.for_model(target.model_type, **values)
    moe.architectures = [type(moe).__name__.replace("Config", "ForCausalLM")]
    return moe


def tensor_files(src: Path) -> dict[str, str]:
    """Every stored tensor's name -> the safetensors file (relative to ``src``) that holds it."""
    from safetensors import SafetensorError, safe_open

    if (src / INDEX_FILE).is_file():
        try:
            return dict(json.loads((src / INDEX_FILE).read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UpcycleError(f"{src / INDEX_FILE} is not a safetensors index: {err!r}") from None
    if not (src / SINGLE_FILE).is_file():
        raise UpcycleError(f"{src} holds no weights: neither {SINGLE_FILE} nor {INDEX_FILE} (pytorch_model.bin is "
                           f"not read: save the model with safe_serialization=True first)")
    try:
        with safe_open(src / SINGLE_FILE, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise UpcycleError(f"cannot read {src / SINGLE_FILE}: {err}") from None


def expected_names(config) -> tuple[set[str], set[str]]:
    """The dense model's parameter names (all it may load) and those it needs (a tied lm_head is not)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, whatever the model's size
        names = set(AutoModelForCausalLM.from_config(config).state_dict())
    needed = names - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    return names, needed


def check_complete(src: Path, files: dict[str, str], needed: set[str]) -> None:
    missing = sorted(needed - set(files))
    if missing:
        raise UpcycleError(f"{src} lacks {len(missing)} tensor(s) of its dense model, e.g. {missing[:3]}: "
                           f"give the complete model")
    absent = sorted({f for f in files.values() if not (src / f).is_file()})
    if absent:
        raise UpcycleError(f"{src} lacks the weight file(s) {absent} named in {INDEX_FILE}")


def layer_groups(names: list[str]) -> list[list[str]]:
    """The tensors outside the decoder layers, then each layer's, in layer order: one shard each."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name in names:
        match = _LAYER.match(name)
        groups[int(match.group(1)) if match else -1].append(name)
    return [sorted(groups[key]) for key in sorted(groups)]


def read_tensors(src: Path, files: dict[str, str], names: list[str]) -> dict[str, torch.Tensor]:
    """``names`` from the lazily opened safetensors: only these tensors are read into memory."""
    from safetensors import SafetensorError, safe_open

    by_file: dict[str, list[str]] = defaultdict(list)
    for name in names:
        by_file[files[name]].append(name)
    tensors = {}
    for file, file_names in by_file.items():
        try:
            with safe_open(src / file, framework="pt") as f:
                tensors.update((name, f.get_tensor(name)) for name in file_names)
        except (SafetensorError, OSError) as err:
            raise UpcycleError(f"cannot read {file_names[:3]} from {src / file}: {err}") from None
    return tensors


def convert(tensors: dict[str, torch.Tensor], target: Target, upcycler: Upcycler,
            hidden_size: int) -> dict[str, torch.Tensor]:
    """One group of dense tensors as MoE tensors: each dense MLP weight as E expert copies, plus
    the router (and Qwen2-MoE's all-zero shared expert, see ``Target``)."""
    # Cast before copying: the E copies are made once, in the output dtype.
    tensors = {name: upcycler.cast(t) for name, t in tensors.items()}
    out, layers = {}, set()
    for name, tensor in tensors.items():
        match = _DENSE_MLP.match(name)
        if match is None:
            out[name] = tensor
            continue
        layer, proj = match.groups()
        for e, copy in enumerate(upcycler.expert_copies(tensor)):
            out[f"{layer}.{target.block}.experts.{e}.{target.expert_names[proj]}.weight"] = copy
        layers.add(layer)
    for layer in sorted(layers):
        block, like = f"{layer}.{target.block}", tensors[f"{layer}.mlp.gate_proj.weight"]
        out[f"{block}.gate.weight"] = upcycler.router(hidden_size, like.dtype)
        if target.zero_shared_expert:
            h = hidden_size
            empty = {"gate_proj": (1, h), "up_proj": (1, h), "down_proj": (h, 1)}
            out.update({f"{block}.shared_expert.{k}.weight": like.new_zeros(s) for k, s in empty.items()})
            out[f"{block}.shared_expert_gate.weight"] = like.new_zeros(1, h)
    return out


def write_shards(src: Path, files: dict[str, str], names: list[str],
                 convert_group: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], dest: Path) -> None:
    """Read, convert and write one group (layer) at a time, then the index."""
    from safetensors.torch import save_file

    groups = layer_groups(names)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = convert_group(read_tensors(src, files, group))
        save_file(tensors, str(dest / shard), metadata={"format": "pt"})
        weight_map.update((name, shard) for name in tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors  # before the next layer is read: peak memory is one upcycled layer
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path, dest: Path) -> list[str]:
    copied = []
    for pattern in SIDE_FILES:
        for path in sorted(src.glob(pattern)):
            if path.is_file() and not (dest / path.name).exists():
                shutil.copy2(path, dest / path.name)
                copied.append(path.name)
    return copied


def upcycle_hf(src: Path, out: Path, opts: Options) -> Path:
    """Write the MoE model of the dense Hugging Face model in ``src`` to the new directory ``out``."""
    if opts.placement is not None:
        raise UpcycleError(f"--placement {opts.placement}: a Hugging Face model is upcycled in every layer "
                           f"(the option is for our GPT)")
    target = source_target(src)
    config = dense_config(src)
    check_dense_features(config, target)
    moe_config = target_config(config, target, opts)
    files = tensor_files(src)
    names, needed = expected_names(config)
    check_complete(src, files, needed)
    upcycler = Upcycler(opts, config.initializer_range)
    with staged_dir(out) as staging:
        write_shards(src, files, sorted(names & set(files)),
                     lambda tensors: convert(tensors, target, upcycler, config.hidden_size), staging)
        moe_config.save_pretrained(staging)
        copy_side_files(src, staging)
    return out
