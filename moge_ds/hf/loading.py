"""Building a Hugging Face MoE causal LM from a local directory, in the training dtype.

Under ZeRO-3 no rank ever holds the whole model. transformers builds it as ZeRO-3 partitions while
an ``HfDeepSpeedConfig`` is alive; a pretrained model is then filled in place: every rank reads from
the memory-mapped safetensors only the rows its own partitions cover, with no collective.
``from_pretrained`` is not used there because transformers 5.15.1 reads every shard into every rank
under ZeRO-3 (measured: it does not save memory). Checkpoint names and layouts (Mixtral's per-expert
``block_sparse_moe.experts.N.w1`` and the fused ``mlp.experts.gate_up_proj`` alike) are mapped onto the
model's by transformers' own conversion rules, applied to the experts a rank needs.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
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
    rank then: building is collective). ``ds`` None: the whole model in fp32, in this process."""
    from transformers import AutoModelForCausalLM

    ds = ds or {}
    dtype = training_dtype(ds)
    torch.manual_seed(seed)
    if ds.get("zero_optimization", {}).get("stage", 0) == 3:
        pretrained = model.hf_init == "pretrained"
        with partitioned_building(ds, initialise=not pretrained):
            net = AutoModelForCausalLM.from_config(read_config(model.hf_path), dtype=dtype)
        rotary_buffers_in_fp32(net)
        if pretrained:
            load_partitioned(net, model.hf_path)
        return net
    if model.hf_init == "random":
        return AutoModelForCausalLM.from_config(read_config(model.hf_path), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model.hf_path, local_files_only=True, dtype=dtype)


@contextmanager
def partitioned_building(ds: dict, initialise: bool = True):
    """While open, transformers builds models as ZeRO-3 partitions of ``ds`` and initialises them (one
    module gathered at a time), unless ``initialise`` is False: for weights about to be loaded, whose
    random initialisation would cost a module's gather on every rank and rank 0's time for nothing.
    A bare ``deepspeed.zero.Init`` is not enough: transformers then initialises weights on the empty
    partitions and the experts come out NaN."""
    from transformers.integrations import deepspeed as hf_deepspeed

    kept = hf_deepspeed.HfDeepSpeedConfig(deepcopy(ds))  # transformers holds it by weakref only
    initialise_weights = hf_deepspeed.initialize_weights_zero3  # what from_config calls after building
    if not initialise:
        hf_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        yield kept
    finally:
        hf_deepspeed.initialize_weights_zero3 = initialise_weights
        hf_deepspeed.unset_hf_deepspeed_config()


@torch.no_grad()
def rotary_buffers_in_fp32(model: torch.nn.Module) -> None:
    """Recompute the rotary frequencies in fp32, by transformers' own initialisation. ``zero.Init`` makes
    every floating tensor created while building in the training dtype, these buffers included, and in
    bf16 the frequencies are off by up to 0.4%: tens of radians of RoPE angle at 32k positions.
    ``from_pretrained`` and DeepSpeed's engine keep them fp32. Buffers are whole on every rank."""
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
            module.inv_freq = module.inv_freq.float()
            module.original_inv_freq = module.original_inv_freq.float()
            model._init_weights(module)


def load_partitioned(model: torch.nn.Module, path: str) -> None:
    """Fill a ZeRO-3-partitioned ``model`` with the safetensors weights under ``path``: every rank reads,
    from the memory-mapped checkpoint, only the rows of each parameter that its own partition covers,
    and copies them in. No gather, no broadcast: a rank's peak above its partitions is one block of
    rows (``ROWS_READ_NUMEL``), or one whole parameter where a layout conversion cannot be cut into
    rows. Every rank checks the checkpoint covers the model before reading, and all raise together
    if any failed (one all-reduce at the end)."""
    from safetensors import SafetensorError

    failure = None
    try:
        reader = CheckpointReader(path, model)
        for name, param in model.named_parameters():  # a tied weight (lm_head = embed_tokens) once
            _fill_partition(param, name, reader)
        for name, buffer in model.named_buffers():
            if reader.has(name):  # buffers are whole on every rank (they are small)
                buffer.copy_(reader.tensor(name))
    except (HFModelError, OSError, SafetensorError) as err:  # e.g. a shard only this rank reads is damaged
        failure = err
    _raise_together(failure)


def _raise_together(failure: Exception | None) -> None:
    """Raise on every rank if loading failed on any: a rank that failed alone would leave the others
    waiting in ``deepspeed.initialize`` until the collective timeout. A failure only some ranks met
    (a shard only they read) is reported by those ranks; one all met, once by rank 0."""
    import torch.distributed as dist

    from moge_ds.distributed import collective_device

    failed = torch.tensor([float(failure is not None)], device=collective_device())
    dist.all_reduce(failed)
    if not failed.item():
        return
    error = HFModelError(str(failure) if failure else "another rank could not read its part of the checkpoint: "
                         "its error is above (a damaged or missing shard?)")
    error.rank_specific = failure is not None and failed.item() < dist.get_world_size()
    raise error from failure


# Elements read at once when a rank fills its partition (4 MiB of fp32): bounds the transient of a large
# partition (an embedding, one layer's experts) independently of the model.
ROWS_READ_NUMEL = 2**20


@torch.no_grad()
def _fill_partition(param: torch.nn.Parameter, name: str, reader: CheckpointReader) -> None:
    """Copy this rank's ZeRO-3 partition of ``param`` from the checkpoint. The partition holds the flat
    elements [rank * P, (rank + 1) * P) of the whole parameter, padded past its end on the last rank
    (as DeepSpeed's ``_partition_param`` cuts it; the padding is never read), so only the rows (first
    dimension) covering that range are read."""
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    reader.check_shape(name, tuple(param.ds_shape))  # on every rank, whatever its partition covers
    part = param.ds_tensor  # [P]
    if part.status != PartitionedParamStatus.AVAILABLE:
        raise HFModelError(f"{name}: its ZeRO-3 partition is not in memory (offload_param to nvme?): loading "
                           f"pretrained weights needs offload_param device none or cpu")
    start = dist.get_rank(group=param.ds_process_group) * part.ds_numel
    stop = min(start + part.ds_numel, param.ds_numel)
    if start >= stop:  # all padding: a parameter smaller than the ranks
        return
    rows = param.ds_shape[0] if len(param.ds_shape) else 1
    row = param.ds_numel // rows  # elements per row
    first, last = start // row, -(-stop // row)
    step = reader.rows_per_read(name, row)
    for a in range(first, last, step):
        b = min(a + step, last)
        block = reader.rows(name, a, b).reshape(-1)
        if block.numel() != (b - a) * row:
            raise HFModelError(f"checkpoint tensor for {name} has {block.numel() // max(b - a, 1)} elements per row, "
                               f"the model's {tuple(param.ds_shape)} has {row}: not a checkpoint of this model")
        lo, hi = max(start, a * row), min(stop, b * row)
        part[lo - start:hi - start].copy_(block[lo - a * row:hi - a * row])


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
        wanted = {name for name, _ in model.named_parameters()}
        missing = sorted(wanted - set(self.plan))
        if missing:
            raise HFModelError(f"{path} has no weights for {len(missing)} of the model's parameters, e.g. "
                               f"{missing[:3]}: it is not a checkpoint of this model (or set model.hf_init=random)")

    def has(self, name: str) -> bool:
        return name in self.plan

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``."""
        keys, converter = self.plan[name]
        if converter is None:
            return self._read(keys[0])
        sources = [(key, pattern, lambda key=key: self._read(key)) for key, pattern in keys]
        return self._convert(name, converter, sources)

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a checkpoint tensor whose shape is not the model's ``shape`` (e.g. another vocabulary),
        from the checkpoint's metadata: a row-wise read would otherwise take its first rows silently.
        Tensors merged from one key per expert need one key per row; other conversions are checked
        when made (``_fill_partition`` compares the elements per row)."""
        from transformers.core_model_loading import MergeModulelist

        keys, converter = self.plan[name]
        if converter is None:
            stored = self._shape(keys[0])
            if stored != shape:
                raise HFModelError(f"checkpoint tensor {keys[0]} has shape {stored}, the model's {name} {shape}: "
                                   f"not a checkpoint of this model (its config.json differs from the weights')")
        elif converter.operations and isinstance(converter.operations[0], MergeModulelist):
            per_pattern = Counter(pattern for _, pattern in keys)
            if any(count != shape[0] for count in per_pattern.values()):
                raise HFModelError(f"the checkpoint has {dict(per_pattern)} keys for {name}, whose first dimension "
                                   f"is {shape[0]}: not a checkpoint of this model (another expert count?)")

    def rows_per_read(self, name: str, row_numel: int) -> int:
        """How many rows of ``name`` one ``rows`` call should take: all of them where its conversion cannot
        be cut into rows (it is made whole anyway), else as many as ``ROWS_READ_NUMEL`` elements allow."""
        keys, converter = self.plan[name]
        if converter is not None and not _keeps_rows(converter):
            return sys.maxsize
        return max(1, ROWS_READ_NUMEL // row_numel)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop (first dimension) of tensor ``name``, reading no more of the checkpoint than they
        need: a slice of a copied tensor; experts start:stop of a tensor merged from one key per expert;
        the same rows of each source where the conversion leaves the first dimension alone."""
        keys, converter = self.plan[name]
        if converter is None:
            return self._read(keys[0], start, stop)
        if not _keeps_rows(converter):
            return self.tensor(name)[start:stop]
        from transformers.core_model_loading import MergeModulelist

        if converter.operations and isinstance(converter.operations[0], MergeModulelist):  # a key per expert, in order
            per_pattern: dict[str, list[str]] = {}
            for key, pattern in keys:
                per_pattern.setdefault(pattern, []).append(key)
            sources = [(key, pattern, lambda key=key: self._read(key))
                       for pattern, pattern_keys in per_pattern.items() for key in pattern_keys[start:stop]]
        else:
            sources = [(key, pattern, lambda key=key: self._read(key, start, stop)) for key, pattern in keys]
        return self._convert(name, converter, sources)

    def _convert(self, name: str, converter, sources: list) -> torch.Tensor:
        """Tensor ``name`` made by ``converter`` from ``sources`` ((key, pattern, read) each). A converter
        that makes several tensors from one key (a fused qkv) maps its keys to the first only, so such
        a model is refused as lacking weights."""
        converter = deepcopy(converter)
        for key, pattern, read in sources:
            converter.add_tensor(name, key, pattern, read)
        return converter.convert(name, config=self.config)[name]

    def _shape(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self.root / self.files[key], framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def _read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Checkpoint tensor ``key``, or its rows start:stop (a 0-d tensor: whole)."""
        from safetensors import safe_open

        with safe_open(self.root / self.files[key], framework="pt") as f:
            if start is None:
                return f.get_tensor(key)
            rows = f.get_slice(key)
            return rows[start:stop] if rows.get_shape() else f.get_tensor(key)


def _keeps_rows(converter) -> bool:
    """Whether rows of ``converter``'s output come from the same rows of its inputs (or, after merging one
    key per expert, from those experts' keys): true for transformers' expert fusions (merge along dim
    0, then concatenate or transpose along other dimensions)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose

    ops = list(converter.operations)
    if ops and isinstance(ops[0], MergeModulelist):
        if ops[0].dim != 0:
            return False
        ops = ops[1:]
    # Positive dimensions only: a negative one may be dim 0 of a low-rank tensor. A Transpose that
    # checks dimensions decides from the whole tensor's shape.
    return all((isinstance(op, Concatenate) and op.dim > 0)
               or (isinstance(op, Transpose) and min(op.dim0, op.dim1) > 0 and not op.check_dims) for op in ops)


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
