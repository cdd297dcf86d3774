"""Building a Hugging Face MoE causal LM from a local directory, in the training dtype.

Under ZeRO-3 no rank ever holds the whole model. transformers builds it as ZeRO-3 partitions while
an ``HfDeepSpeedConfig`` is alive; a pretrained model is then filled one module at a time: every rank
gathers that module's parameters, rank 0 copies them in from the memory-mapped safetensors, and
ZeRO-3 partitions them again. ``from_pretrained`` is not used there because transformers 5.15.1
reads every shard into every rank under ZeRO-3 (measured: it does not save memory). Checkpoint names
and layouts (Mixtral's per-expert ``block_sparse_moe.experts.N.w1`` and the fused
``mlp.experts.gate_up_proj`` alike) are mapped onto the model's by transformers' own conversion rules,
one parameter (one layer's experts) at a time.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moge_ds.hf.families import HFModelError, read_config

if TYPE_CHECKING:
    from moge_ds.config import ModelConfig

# What from_pretrained reads weights from; one of them must be in a "pretrained" model directory.
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
WEIGHT_FILES = (*SAFETENSORS_FILES, "pytorch_model.bin", "pytorch_model.bin.index.json")


def has_weights(path: str, files: tuple[str, ...] = WEIGHT_FILES) -> bool:
    return any((Path(path) / name).is_file() for name in files)


def training_dtype(ds: dict) -> torch.dtype:
    """The dtype DeepSpeed trains the module in: bf16 or fp16 if the ds_config enables them, else fp32."""
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def build(model: ModelConfig, seed: int, ds: dict | None = None) -> torch.nn.Module:
    """The causal LM of ``model.hf_path`` in the training dtype of ``ds``: its weights (``hf_init``
    "pretrained") or fresh ones, as ZeRO-3 partitions if ``ds`` is a ZeRO-3 config (call this on every
    rank then: the loading gathers). ``ds`` None: the whole model in fp32, in this process."""
    from transformers import AutoModelForCausalLM

    ds = ds or {}
    dtype = training_dtype(ds)
    torch.manual_seed(seed)
    if ds.get("zero_optimization", {}).get("stage", 0) == 3:
        with partitioned_building(ds):
            net = AutoModelForCausalLM.from_config(read_config(model.hf_path), dtype=dtype)
        if model.hf_init == "pretrained":
            load_partitioned(net, model.hf_path)
        return net
    if model.hf_init == "random":
        return AutoModelForCausalLM.from_config(read_config(model.hf_path), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model.hf_path, local_files_only=True, dtype=dtype)


@contextmanager
def partitioned_building(ds: dict):
    """While open, transformers builds (and initialises) models as ZeRO-3 partitions of ``ds``. A bare
    ``deepspeed.zero.Init`` is not enough: transformers then initialises weights on the empty
    partitions and the experts come out NaN."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    kept = HfDeepSpeedConfig(deepcopy(ds))  # transformers holds it by weakref only
    try:
        yield kept
    finally:
        unset_hf_deepspeed_config()


def load_partitioned(model: torch.nn.Module, path: str) -> None:
    """Fill a ZeRO-3-partitioned ``model`` with the safetensors weights under ``path``, one module at a
    time (peak: one module's full parameters on every rank; on rank 0 twice that, or the checkpoint
    tensors one of them is made of while converting). Every rank checks the checkpoint covers the model
    before any gather."""
    import deepspeed
    import torch.distributed as dist

    reader = CheckpointReader(path, model)
    is_source = dist.get_rank() == 0
    filled: set[int] = set()  # a tied weight (lm_head = embed_tokens) is filled once, under its first name
    for module_name, module in model.named_modules():
        params = {name: p for name, p in module.named_parameters(prefix=module_name, recurse=False)
                  if id(p) not in filled}
        filled.update(id(p) for p in params.values())
        if params:
            # Read and convert before gathering, in the training dtype, so that rank 0 never holds the
            # checkpoint's tensors and the gathered parameters at once.
            values = {name: reader.tensor(name).to(p.dtype) for name, p in params.items()} if is_source else {}
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                for name, param in params.items():
                    if is_source:
                        param.data.copy_(values.pop(name).reshape(param.shape))
        for name, buffer in module.named_buffers(prefix=module_name, recurse=False):
            if reader.has(name):  # buffers are whole on every rank: each reads its own (they are small)
                buffer.copy_(reader.tensor(name))


class CheckpointReader:
    """The model's tensors, by the model's names, read lazily from a safetensors checkpoint (one file
    or an index of shards), converted from the checkpoint's layout as ``from_pretrained`` would.

    ``plan`` maps each model tensor name to the checkpoint keys it is made of and the transformers
    ``WeightConverter`` that makes it (None: a copy, maybe renamed)."""

    def __init__(self, path: str, model: torch.nn.Module):
        self.root = Path(path)
        self.config = model.config
        self.files = _safetensors_files(self.root)
        self.plan = _conversion_plan(model, sorted(self.files))
        self._converted: dict[str, torch.Tensor] = {}  # made alongside a requested tensor, not yet taken
        wanted = {name for name, _ in model.named_parameters()}
        missing = sorted(wanted - set(self.plan))
        if missing:
            raise HFModelError(f"{path} has no weights for {len(missing)} of the model's parameters, e.g. "
                               f"{missing[:3]}: it is not a checkpoint of this model (or set model.hf_init=random)")

    def has(self, name: str) -> bool:
        return name in self.plan

    def tensor(self, name: str) -> torch.Tensor:
        if name in self._converted:
            return self._converted.pop(name)
        keys, converter = self.plan[name]
        if converter is None:
            return self._read(keys[0])
        converter = deepcopy(converter)
        for key, pattern in keys:
            converter.add_tensor(name, key, pattern, lambda key=key: self._read(key))
        made = converter.convert(name, config=self.config)
        self._converted.update({k: v for k, v in made.items() if k != name and k in self.plan})
        return made[name]

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.root / self.files[key], framework="pt") as f:
            return f.get_tensor(key)


def _safetensors_files(root: Path) -> dict[str, str]:
    """Checkpoint key -> the safetensors file holding it."""
    from safetensors import safe_open

    index = root / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = root / "model.safetensors"  # start-up checks made sure one of the two is there
    with safe_open(single, framework="pt") as f:
        return {key: single.name for key in f.keys()}


def _conversion_plan(model: torch.nn.Module, keys: list[str]) -> dict[str, tuple]:
    """Model tensor name -> (``[checkpoint key]``, None) for a copy, or (``[(key, source pattern)]``,
    converter) for a tensor transformers assembles from several keys (e.g. one layer's experts)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    own = dict(model.state_dict(keep_vars=True))
    plan: dict[str, tuple] = {}
    for key in sorted(keys, key=dot_natural_key):  # natural order: experts stack as 0, 1, ..., 10
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if name not in own:
            continue
        if pattern is None:
            plan[name] = ([key], None)
        else:
            plan.setdefault(name, ([], by_pattern[pattern]))[0].append((key, pattern))
    return plan
