"""Read raw documents from text files, JSONL, parquet or a Hugging Face dataset.

One reader for tokenizer training and preprocessing, so both see the same documents and
the same checks: missing paths, empty inputs, undecodable bytes and malformed JSONL lines
fail with the file (and line or byte offset) named.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "/usr/share/doc/python3.11/html/_sources/**/*.txt"
DEFAULT_CORPUS_HELP = ("The default corpus is the Python 3.11 documentation from Debian's python3.11-doc package: "
                       "install it with `sudo apt-get install -y python3.11-doc` (or `make system-deps`), "
                       "or pass your own text with --input.")

OnDecodeError = Literal["strict", "replace", "skip"]


class DataError(ValueError):
    """Bad input data; the message names the input and what is allowed."""


@dataclass(frozen=True)
class SourceSpec:
    """Where documents come from.

    ``inputs`` are paths or globs (``**`` allowed), or ``hf:NAME[:CONFIG]`` for a Hugging Face
    dataset (a local script/directory or, when online, a hub name).
    """

    inputs: tuple[str, ...]
    text_field: str = "text"
    doc_per: Literal["file", "line"] = "file"  # plain text: one document per file or per line
    on_decode_error: OnDecodeError = "strict"
    hf_split: str = "train"
    # Plain text: a line matching this regex (whole line) ends a document, e.g. "%" (fortune files)
    # or "From .*" (mbox); the separator lines themselves are dropped. Overrides doc_per.
    doc_separator: str | None = None

    def __post_init__(self) -> None:
        if self.doc_separator is not None:
            try:
                re.compile(self.doc_separator)
            except re.error as err:
                raise DataError(f"--doc-separator {self.doc_separator!r} is not a regular expression: {err}") from None


def expand_inputs(inputs: tuple[str, ...]) -> list[str]:
    """Resolve globs to a sorted, de-duplicated file list; ``hf:`` specs pass through."""
    files: list[str] = []
    for spec in inputs:
        if spec.startswith("hf:"):
            files.append(spec)
            continue
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
        matches = [m for m in matches if os.path.isfile(m)] if glob.has_magic(spec) else matches
        if not matches or not os.path.exists(matches[0]):
            hint = f" {DEFAULT_CORPUS_HELP}" if spec == DEFAULT_CORPUS else ""
            raise DataError(f"input {spec!r} matches no file.{hint}")
        if os.path.isdir(matches[0]):
            raise DataError(f"input {spec!r} is a directory: pass files or a glob such as '{spec}/**/*.txt'")
        files.extend(m for m in matches if m not in files)
    return files


def _decode(data: bytes, path: str, on_error: OnDecodeError) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if on_error == "replace":
            return data.decode("utf-8", errors="replace")
        if on_error == "skip":
            log.warning("skipping %s: not UTF-8 at byte offset %d", path, err.start)
            return None
        raise DataError(f"{path} is not UTF-8: byte {data[err.start:err.start + 1]!r} at offset {err.start}. "
                        f"Fix the file, or pass --on-decode-error replace|skip") from None


def _text_documents(path: str, spec: SourceSpec) -> Iterator[str]:
    text = _decode(Path(path).read_bytes(), path, spec.on_decode_error)
    if text is None:
        return
    if spec.doc_separator is not None:
        yield from _split_at_separators(text, spec.doc_separator)
    elif spec.doc_per == "file":
        if text.strip():
            yield text
    else:
        yield from (line for line in text.splitlines() if line.strip())


def _split_at_separators(text: str, separator: str) -> Iterator[str]:
    pattern = re.compile(separator)
    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        if pattern.fullmatch(line.rstrip("\r\n")):
            if "".join(lines).strip():
                yield "".join(lines)
            lines = []
        else:
            lines.append(line)
    if "".join(lines).strip():
        yield "".join(lines)


def _jsonl_documents(path: str, spec: SourceSpec) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, f"{path} line {lineno}", spec.on_decode_error)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {lineno} is not JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict) or spec.text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path} line {lineno} has no field {spec.text_field!r} (it has {keys}); "
                                f"choose the field with --text-field")
            if str(record[spec.text_field]).strip():
                yield str(record[spec.text_field])


def _parquet_documents(path: str, spec: SourceSpec) -> Iterator[str]:
    import pyarrow.parquet as pq

    import pyarrow

    try:
        table = pq.ParquetFile(path)
    except (pyarrow.ArrowInvalid, OSError) as err:
        raise DataError(f"{path} is not a Parquet file ({err}): name it by its format (.txt, .jsonl, .parquet)") \
            from None
    if spec.text_field not in table.schema_arrow.names:
        raise DataError(f"{path} has no column {spec.text_field!r} (it has {table.schema_arrow.names}); "
                        f"choose the column with --text-field")
    for batch in table.iter_batches(columns=[spec.text_field]):
        yield from (t for t in batch.column(0).to_pylist() if t and t.strip())


def _hf_documents(name: str, spec: SourceSpec) -> Iterator[str]:
    from datasets import load_dataset

    path, _, config = name[3:].partition(":")
    dataset = load_dataset(path, config or None, split=spec.hf_split, streaming=True)
    for row in dataset:
        if spec.text_field not in row:
            raise DataError(f"dataset {name!r} has no field {spec.text_field!r} (it has {sorted(row)})")
        if row[spec.text_field].strip():
            yield row[spec.text_field]


def documents_of(path: str, spec: SourceSpec) -> Iterator[str]:
    """The non-empty documents of one input file (or ``hf:`` spec)."""
    if path.startswith("hf:"):
        return _hf_documents(path, spec)
    if path.endswith((".jsonl", ".json")):
        return _jsonl_documents(path, spec)
    if path.endswith(".parquet"):
        return _parquet_documents(path, spec)

    return _text_documents(path, spec)


def iter_documents(spec: SourceSpec) -> Iterator[str]:
    """Every document of every input, in a fixed order; an input with none is an error."""
    for path in expand_inputs(spec.inputs):
        count = 0
        for doc in documents_of(path, spec):
            count += 1
            yield doc
        if count == 0:
            raise DataError(f"input {path!r} holds no text (empty, blank, or every document skipped)")
