"""Tokenize raw text into a megatron-core IndexedDataset (``<prefix>.bin`` + ``<prefix>.idx``).

CLI::

    python -m moge_ds.data.preprocess --tokenizer tokenizers/pydoc8k.model --output-prefix data/pydoc \
        [--input 'more/**/*.txt' ...] [--workers 2]

Each document is tokenized and followed by one EOD token. Outputs are written under temporary
names and renamed once complete, so an interrupted run leaves no half-written dataset.
``PREFIX.tokenizer.json`` records which tokenizer made the data (training refuses another one).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moge_ds.data.documents import DataError, SourceSpec, iter_documents
from moge_ds.data.tokenizer import HFTokenizer, Tokenizer, add_source_args, load_tokenizer, source_from_args

# Beside PREFIX.bin/.idx: the identity of the tokenizer that made them, checked when training starts.
TOKENIZER_SUFFIX = ".tokenizer.json"

_worker_tokenizer: Tokenizer | HFTokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(model_path)


def _encode(doc: str) -> list[int]:
    return _worker_tokenizer.tokenize(doc) + [_worker_tokenizer.eod]


@dataclass
class PreprocessStats:
    documents: int
    tokens: int
    seconds: float


def preprocess(spec: SourceSpec, tokenizer_path: str, output_prefix: str, workers: int = 1,
               progress: bool = True) -> PreprocessStats:
    """Tokenize every document of ``spec`` into ``output_prefix``.{bin,idx}; returns the counts.

    Documents keep their input order whatever ``workers`` is, so the output is identical.
    """
    if workers < 1:
        raise DataError(f"--workers must be >= 1 (processes that tokenize), got {workers}")
    # Imported here: megatron-core takes ~10 s to import, and bad options are refused before that.
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tokenizer = load_tokenizer(tokenizer_path)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(f"{tmp_prefix}.bin", dtype=dtype)
    documents = tokens = 0
    start = time.perf_counter()
    pool = mp.get_context("fork").Pool(workers, _init_worker, (tokenizer_path, )) if workers > 1 else None
    try:
        if pool is None:
            _init_worker(tokenizer_path)
            encoded = map(_encode, iter_documents(spec))
        else:
            encoded = pool.imap(_encode, iter_documents(spec), chunksize=16)
        with tqdm(encoded, unit="doc", disable=not progress, desc="tokenizing") as bar:
            for ids in bar:
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                documents += 1
                tokens += len(ids)
                if documents % 64 == 0:
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(tok_per_s=f"{tokens / elapsed:,.0f}", tokens=f"{tokens:,}")
        if documents == 0:
            raise DataError(f"no documents in {spec.inputs}")
        builder.finalize(f"{tmp_prefix}.idx")
        Path(f"{tmp_prefix}{TOKENIZER_SUFFIX}").write_text(json.dumps(tokenizer.identity, indent=1))
        for suffix in (".bin", ".idx", TOKENIZER_SUFFIX):
            os.replace(f"{tmp_prefix}{suffix}", f"{output_prefix}{suffix}")
    finally:
        if pool is not None:
            pool.terminate()
        builder.data_file.close()
        for suffix in (".bin", ".idx", TOKENIZER_SUFFIX):
            Path(f"{tmp_prefix}{suffix}").unlink(missing_ok=True)
    return PreprocessStats(documents, tokens, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moge_ds.data.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(parser)
    parser.add_argument("--tokenizer", required=True,
                        help="a sentencepiece .model file, or a directory holding a Hugging Face tokenizer")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help=">= 1")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    args = parser.parse_args(argv)
    existing = [f"{args.output_prefix}{ext}" for ext in (".bin", ".idx") if os.path.exists(args.output_prefix + ext)]
    if existing and not args.overwrite:
        parser.exit(2, f"error: {' and '.join(existing)} exist (runs may have trained on them): give another "
                       f"--output-prefix, or --overwrite to replace them\n")
    torch.set_num_threads(1)
    try:
        stats = preprocess(source_from_args(args), args.tokenizer, args.output_prefix, args.workers)
    except DataError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {args.output_prefix}.bin/.idx: {stats.documents:,} documents, {stats.tokens:,} tokens "
          f"in {stats.seconds:.1f}s ({stats.tokens / stats.seconds:,.0f} tokens/s, {args.workers} workers)")


if __name__ == "__main__":
    main()
