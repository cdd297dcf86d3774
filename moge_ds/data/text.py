"""Fixed-length LM samples through megatron-core's GPTDataset and BlendedMegatronDatasetBuilder.

megatron-core does the document shuffling, packing, train/valid/test split and weighted
blending (deterministic given the seed, cached as .npy indices). This module checks the
inputs, builds the three splits, and serves micro-batches from any sample index so that a
resumed run continues with exactly the batch it would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from typing import TYPE_CHECKING

from moge_ds.data.documents import DataError
from moge_ds.data.preprocess import TOKENIZER_SUFFIX
from moge_ds.data.tokenizer import Tokenizer

# megatron-core is imported where it is used: it takes seconds to import (most of a rank's start-up
# before DeepSpeed), and a config error, found before any data is read, should not wait for it.
if TYPE_CHECKING:
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset

log = logging.getLogger(__name__)
# Six INFO lines each time an index is opened (every check opens one): they would bury a data error.
logging.getLogger("megatron.core.datasets.indexed_dataset").setLevel(logging.WARNING)


def check_tokenizer_matches(prefix: str, tokenizer: Tokenizer) -> None:
    """The tokenizer that made ``prefix`` (recorded at preprocessing) is ``tokenizer``, or refuse:
    a smaller vocabulary fails on out-of-range ids, a larger one trains on the wrong tokens silently."""
    record = Path(prefix + TOKENIZER_SUFFIX)
    if not record.is_file():
        log.warning("%s has no %s (made before moge-ds recorded it): cannot check that %s made it, only that "
                    "its token ids fit", prefix, TOKENIZER_SUFFIX, tokenizer.path)
        check_token_ids(prefix, tokenizer)
        return
    made_by = json.loads(record.read_text())
    ours = tokenizer.identity
    if (made_by["sha256"], made_by["vocab_size"]) != (ours["sha256"], ours["vocab_size"]):
        raise DataError(f"{prefix} was tokenized by {made_by['model']} (vocab {made_by['vocab_size']}, sha256 "
                        f"{made_by['sha256'][:12]}), not by data.tokenizer {ours['model']} (vocab "
                        f"{ours['vocab_size']}, sha256 {ours['sha256'][:12]}): use that tokenizer, or re-run "
                        f"python -m moge_ds.data.preprocess with this one")


def check_indexed_dataset(prefix: str) -> IndexedDataset:
    """Open ``prefix``.{bin,idx}, failing clearly if either is missing or they disagree."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise DataError(f"{prefix}{suffix} does not exist: create it with `python -m moge_ds.data.preprocess "
                            f"--output-prefix {prefix}` (or `make data`)")
    try:
        dataset = IndexedDataset(prefix)
    except Exception as err:  # megatron raises bare assertions on corrupt index headers
        raise DataError(f"{prefix}.idx is not a megatron-core index ({type(err).__name__}: {err})") from None
    expected = int(dataset.index.sequence_lengths.sum(dtype=np.int64)) * dataset.index.dtype_size
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise DataError(f"{prefix}.bin has {actual} bytes but {prefix}.idx describes {expected}: the pair does not "
                        f"match (truncated or from another run); re-run preprocessing")
    return dataset


def document_lengths(prefix: str) -> np.ndarray:
    """Tokens per document of ``prefix``, copied out of its index.

    megatron-core's index reader unmaps the .idx file when the IndexedDataset is collected, so a
    view into it that outlives the dataset reads unmapped memory (SIGSEGV on every rank).
    """
    dataset = check_indexed_dataset(prefix)
    return np.array(dataset.index.sequence_lengths, dtype=np.int64)


def check_token_ids(prefix: str, tokenizer: Tokenizer) -> None:
    """Every token id of ``prefix``.bin is one of ``tokenizer``'s: data made by a larger tokenizer (before
    the tokenizer record existed) would otherwise fail with an IndexError in the middle of a step. Reads
    the whole file, so it runs only for data without a tokenizer record."""
    dtype = check_indexed_dataset(prefix).index.dtype
    if Path(prefix + ".bin").stat().st_size == 0:  # nothing to check (numpy cannot map an empty file)
        return
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")  # numpy owns this mapping: no lifetime trap
    largest = int(tokens.max())
    if largest >= tokenizer.vocab_size:
        raise DataError(f"{prefix}.bin holds token id {largest}, but data.tokenizer {tokenizer.path} has "
                        f"{tokenizer.vocab_size} tokens (ids 0..{tokenizer.vocab_size - 1}): the data was made by "
                        f"a larger tokenizer. Use the tokenizer that made it, or re-run `python -m "
                        f"moge_ds.data.preprocess --tokenizer {tokenizer.path} --output-prefix {prefix}`")


SPLIT_NAMES = ("train", "valid", "test")


def _split_shares(split: str) -> list[float]:
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    try:
        return parse_and_normalize_split(split)
    except (AssertionError, ValueError, ZeroDivisionError):
        raise DataError(f"data.split must be three non-negative shares like \"98,1,1\", got {split!r}") from None


def split_documents(split: str, num_documents: int) -> list[range | None]:
    """The document range of each split, computed as megatron-core computes it; None for a 0 share."""
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix

    matrix = convert_split_vector_to_split_matrix(_split_shares(split))
    return [None if bounds is None else range(int(round(bounds[0] * num_documents)),
                                              int(round(bounds[1] * num_documents))) for bounds in matrix]


def working_split(lengths: np.ndarray, split: str, seq_length: int) -> str | None:
    """The split nearest ``split`` (by document boundaries) under which every split with a share holds
    one sample of ``seq_length + 1`` tokens, as document counts ("15,1,1"); None if no split does.

    The train split ends at document b1 and the valid split at b2; each b1 bounds the b2 that work.
    """
    need, n, shares = seq_length + 1, len(lengths), _split_shares(split)
    has = [share > 0 for share in shares]
    target = np.cumsum(shares)[:2] * n
    cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    b1 = np.arange(n + 1)
    b1_works = cum[b1] >= need if has[0] else b1 == 0
    lo2 = np.searchsorted(cum, cum[b1] + need) if has[1] else b1  # valid holds a sample, or nothing
    hi2 = np.full(n + 1, np.searchsorted(cum, cum[n] - need, side="right") - 1 if has[2] else n)
    if not has[2]:
        lo2 = np.maximum(lo2, n)  # no test split: valid runs to the last document
    if not has[1]:
        hi2 = np.minimum(hi2, b1)
    works = b1_works & (lo2 <= hi2)
    if not works.any():
        return None
    b2 = np.clip(np.round(target[1]), lo2, hi2)
    distance = np.where(works, np.abs(b1 - target[0]) + np.abs(b2 - target[1]), np.inf)
    best = int(np.argmin(distance))
    return f"{best},{int(b2[best]) - best},{n - int(b2[best])}"


def check_splits(lengths: np.ndarray, prefix: str, split: str, seq_length: int) -> None:
    """Every split with a share of ``prefix``'s documents (``lengths`` tokens each) holds a document and
    at least one sample of ``seq_length + 1`` tokens.

    megatron-core repeats a split's epochs until it has the samples asked for, so a split with no
    tokens never finishes building (it hangs instead of failing).
    """
    for name, documents in zip(SPLIT_NAMES, split_documents(split, len(lengths))):
        if documents is None:
            continue
        tokens = int(lengths[documents.start:documents.stop].sum(dtype=np.int64))
        if tokens < seq_length + 1:
            raise DataError(f"{prefix}: seq_length {seq_length} is longer than the smallest split holds: data.split "
                            f"{split!r} gives the {name} split {len(documents)} of {len(lengths)} documents and "
                            f"{tokens} tokens, fewer than one sample of seq_length + 1. "
                            f"{_split_advice(lengths, split, seq_length)}")


def _split_advice(lengths: np.ndarray, split: str, seq_length: int) -> str:
    more = "more documents (--doc-per line or --doc-separator when preprocessing) or a shorter model.seq_length"
    suggestion = working_split(lengths, split, seq_length)
    if suggestion is None:
        return (f"No data.split of these {len(lengths)} documents ({int(lengths.sum())} tokens) gives every split "
                f"with a share seq_length + 1 tokens: use {more}")
    return (f"data.split=\"{suggestion}\" works (shares counted in documents: the nearest split that gives every "
            f"split a sample); so would {more}")


def one_epoch_samples(prefixes: list[str], split: str, seq_length: int) -> tuple[int, int, int]:
    """Samples of ``seq_length + 1`` tokens that one pass over each split's documents holds, summed over
    ``prefixes``: a split size that depends on the data alone, not on batch size or rank count."""
    totals = [0, 0, 0]
    for prefix in prefixes:
        lengths = document_lengths(prefix)
        for i, documents in enumerate(split_documents(split, len(lengths))):
            if documents is not None:
                tokens = int(lengths[documents.start:documents.stop].sum(dtype=np.int64))
                totals[i] += max((tokens - 1) // seq_length, 1)
    return totals[0], totals[1], totals[2]


@dataclass(frozen=True)
class TextSplits:
    train: GPTDataset
    valid: GPTDataset | None
    test: GPTDataset | None


def build_text_splits(prefixes: list[str],
                      weights: list[float] | None,
                      tokenizer: Tokenizer,
                      seq_length: int,
                      num_samples: tuple[int | None, int | None, int | None],
                      split: str = "98,1,1",
                      seed: int = 1234,
                      cache_dir: str | None = None) -> TextSplits:
    """Train/valid/test GPTDatasets over a weighted blend of indexed datasets.

    Args:
        prefixes: indexed-dataset prefixes; ``weights`` (same length) blend them, None = one each.
        num_samples: samples wanted from each split (megatron repeats epochs to reach them); None:
            one pass over the split (not with ``weights``: megatron needs a size to blend by).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if weights is not None and len(weights) != len(prefixes):
        raise DataError(f"{len(weights)} blend weights for {len(prefixes)} datasets: give one weight per prefix")
    if weights is not None and not all(math.isfinite(w) and w > 0 for w in weights):
        raise DataError(f"data.weights must be finite and > 0, got {weights}")
    for prefix in prefixes:
        check_splits(document_lengths(prefix), prefix, split, seq_length)
        check_tokenizer_matches(prefix, tokenizer)
    if len(prefixes) > 1 and not dist.is_initialized():
        raise DataError("blending several datasets asks torch.distributed for the rank, and no process group is "
                        "up: run inside `with moge_ds.distributed.single_process_group():` (a lone process) or "
                        "start the ranks through a launcher")
    blend = (list(prefixes), list(weights) if weights is not None else None)
    config = GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=blend, split=split,
                              tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, create_attention_mask=False,
                              path_to_cache=cache_dir or str(Path(prefixes[0]).parent / "index-cache"))
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()
    return TextSplits(train, valid, test)


def lm_batch(dataset, start: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Samples ``start .. start + batch_size - 1`` (wrapping) stacked: tokens/labels/loss_mask ``[B, S]``."""
    samples = [dataset[(start + i) % len(dataset)] for i in range(batch_size)]
    return {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask")}
