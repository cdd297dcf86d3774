"""Train, load and use sentencepiece tokenizers; load Hugging Face ones from a local directory.

CLI::

    python -m moge_ds.data.tokenizer train --input 'corpus/**/*.txt' --model-prefix tokenizers/pydoc8k \
        --vocab-size 8000
    python -m moge_ds.data.tokenizer encode --model tokenizers/pydoc8k.model "some text"
"""

from __future__ import annotations

import argparse
import io
import hashlib
import os
import random
from pathlib import Path
from typing import Iterator, Literal

import sentencepiece as spm

from moge_ds.data.documents import DEFAULT_CORPUS, DataError, SourceSpec, iter_documents

PAD_ID, UNK_ID, EOD_ID = 0, 1, 2


class Tokenizer:
    """A sentencepiece model with the fields megatron-core's GPTDataset reads (``eod``, ``pad``, ``vocab_size``)."""

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file():
            raise DataError(f"tokenizer model {str(path)!r} does not exist: train one with "
                            f"`python -m moge_ds.data.tokenizer train` (or `make tokenizer`)")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        # megatron-core hashes this into the names of its cached sample indices.
        self.unique_identifiers = {"class": "moge_ds.Tokenizer", "model": str(path.resolve()),
                                   "bytes": path.stat().st_size}

    @property
    def identity(self) -> dict:
        """What an indexed dataset records of the tokenizer that made it: the model file's hash and size."""
        return {"sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(), "vocab_size": self.vocab_size,
                "model": str(self.path)}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self.sp.eos_id()

    @property
    def pad(self) -> int:
        return self.sp.pad_id()

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def detokenize(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def pieces(self) -> list[str]:
        """Each id's piece, a word start marked by a leading "\u2581"."""
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory (e.g. the model's own ``tokenizer.json``), with
    the fields of :class:`Tokenizer`; its eos token separates documents."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
             "merges.txt")

    def __init__(self, directory: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = Path(directory)
        try:
            self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise DataError(f"{str(self.path)!r} holds no Hugging Face tokenizer transformers can load: {err}") \
                from None
        if self.hf.eos_token_id is None:
            raise DataError(f"the tokenizer in {self.path} has no eos token, which moge-ds puts between documents")
        self.files = [self.path / name for name in self.FILES if (self.path / name).is_file()]
        self.unique_identifiers = {"class": "moge_ds.HFTokenizer", "model": str(self.path.resolve()),
                                   "bytes": sum(f.stat().st_size for f in self.files)}

    @property
    def identity(self) -> dict:
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in self.files)).hexdigest()
        return {"sha256": digest, "vocab_size": self.vocab_size, "model": str(self.path)}

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eod(self) -> int:
        return self.hf.eos_token_id

    @property
    def pad(self) -> int:
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id

    def tokenize(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.hf.decode([int(i) for i in ids])

    def pieces(self) -> list[str]:
        """Each id's piece, a word start marked by a leading "\u2581" as sentencepiece marks it (byte-level
        BPE marks it "\u0120")."""
        return [piece.replace("\u0120", "\u2581", 1) if piece.startswith("\u0120") else piece
                for piece in self.hf.convert_ids_to_tokens(list(range(self.vocab_size)))]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """A sentencepiece model file, or a directory holding a Hugging Face tokenizer."""
    return HFTokenizer(path) if Path(path).is_dir() else Tokenizer(path)


def _sentences(spec: SourceSpec, sample_size: int, seed: int) -> Iterator[str]:
    """Non-empty lines of the corpus; a uniform reservoir sample of ``sample_size`` lines if > 0."""
    lines = (line for doc in iter_documents(spec) for line in doc.splitlines() if line.strip())
    if sample_size <= 0:
        yield from lines
        return
    rng = random.Random(seed)
    reservoir: list[str] = []
    for i, line in enumerate(lines):
        if i < sample_size:
            reservoir.append(line)
        elif (j := rng.randrange(i + 1)) < sample_size:
            reservoir[j] = line
    yield from reservoir


def train_tokenizer(spec: SourceSpec,
                    model_prefix: str,
                    vocab_size: int = 8000,
                    model_type: Literal["unigram", "bpe"] = "unigram",
                    character_coverage: float = 0.9995,
                    byte_fallback: bool = True,
                    user_defined_symbols: tuple[str, ...] = (),
                    input_sentence_size: int = 2_000_000,
                    seed: int = 1234) -> Tokenizer:
    """Train a sentencepiece model on ``spec``'s documents; writes ``<model_prefix>.model``/``.vocab``.

    At most ``input_sentence_size`` lines (a seeded reservoir sample) are held in memory.
    Special ids: pad 0, unk 1, EOD (``</s>``) 2, newline 3, then ``user_defined_symbols``; no BOS.
    No normalisation, so decoding gives back the exact text.
    """
    check_training_options(vocab_size, character_coverage, input_sentence_size)
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(spec, input_sentence_size, seed), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
            byte_fallback=byte_fallback, user_defined_symbols=["\n", *user_defined_symbols],
            # Keep text exactly (newlines, indentation, repeated spaces): decode(encode(t)) == t.
            normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_digits=True,
            pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOD_ID, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
            train_extremely_large_corpus=False, minloglevel=2)
    except RuntimeError as err:
        if "Vocabulary size too high" in str(err):
            raise DataError(f"vocab_size {vocab_size} is larger than this corpus supports: {err}") from None
        if "smaller than required_chars" in str(err):
            raise DataError(f"vocab_size {vocab_size} is too small for this corpus's characters (plus 256 byte "
                            f"pieces with byte fallback): {err}") from None
        raise
    # Write then rename: a crash never leaves a half-written model behind.
    tmp = Path(f"{model_prefix}.model.tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, f"{model_prefix}.model")
    tokenizer = Tokenizer(f"{model_prefix}.model")
    with open(f"{model_prefix}.vocab.tmp", "w", encoding="utf-8") as f:
        for i in range(tokenizer.vocab_size):
            f.write(f"{tokenizer.sp.id_to_piece(i)}\t{tokenizer.sp.get_score(i)}\n")
    os.replace(f"{model_prefix}.vocab.tmp", f"{model_prefix}.vocab")
    return tokenizer


def check_training_options(vocab_size: int, character_coverage: float, input_sentence_size: int) -> None:
    """Refuse what sentencepiece would stop on with a C++ assertion, or read silently as something else."""
    if vocab_size < 8:
        raise DataError(f"vocab_size (--vocab-size) must be >= 8, got {vocab_size}")
    if not 0.98 <= character_coverage <= 1:
        raise DataError(f"character_coverage (--character-coverage) must be in [0.98, 1] (sentencepiece's range), "
                        f"got {character_coverage}")
    if input_sentence_size < 0:
        raise DataError(f"input_sentence_size (--input-sentence-size) must be >= 0 (0: every line), got "
                        f"{input_sentence_size}")


def token_ids(words: list[str], tokenizer: Tokenizer | HFTokenizer) -> list[int]:
    """``words`` as token ids of ``tokenizer``, or a DataError naming the first that is not one."""
    for word in words:
        if not word.lstrip("-").isdigit() or not 0 <= int(word) < tokenizer.vocab_size:
            raise DataError(f"decode takes token ids, integers in 0..{tokenizer.vocab_size - 1} for {tokenizer.path}, "
                            f"got {word!r}")
    return [int(word) for word in words]


def add_source_args(parser: argparse.ArgumentParser, default_input: str | None = DEFAULT_CORPUS) -> None:
    """The input options shared by the tokenizer and preprocessing CLIs."""
    parser.add_argument("--input", nargs="+", default=[default_input] if default_input else None,
                        required=default_input is None,
                        help="files or globs (txt, jsonl, parquet) or hf:NAME[:CONFIG]; default: Python 3.11 docs")
    parser.add_argument("--text-field", default="text", help="JSONL/parquet/HF field holding the text")
    parser.add_argument("--doc-per", choices=["file", "line"], default="file", help="plain text: document unit")
    parser.add_argument("--doc-separator", metavar="REGEX",
                        help="plain text: a line matching REGEX (whole line) separates documents, e.g. '%%' "
                             "(fortune files) or 'From .*' (mbox)")
    parser.add_argument("--on-decode-error", choices=["strict", "replace", "skip"], default="strict")
    parser.add_argument("--hf-split", default="train")


def source_from_args(args: argparse.Namespace) -> SourceSpec:
    return SourceSpec(tuple(args.input), args.text_field, args.doc_per, args.on_decode_error, args.hf_split,
                      args.doc_separator)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moge_ds.data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a sentencepiece model")
    add_source_args(train)
    train.add_argument("--model-prefix", required=True)
    train.add_argument("--vocab-size", type=int, default=8000, help=">= 8")
    train.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    train.add_argument("--character-coverage", type=float, default=0.9995, help="in [0.98, 1]")
    train.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    train.add_argument("--user-defined-symbols", nargs="*", default=[])
    train.add_argument("--input-sentence-size", type=int, default=2_000_000,
                       help="sample at most this many lines (0: use all)")
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model/.vocab")
    for name in ("encode", "decode"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="a sentencepiece .model file, or a Hugging Face tokenizer "
                       "directory")
        p.add_argument("text", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            if Path(args.model_prefix + ".model").exists() and not args.overwrite:
                parser.exit(2, f"error: {args.model_prefix}.model exists (data may have been tokenized with it): give "
                               f"another --model-prefix, or --overwrite to replace it\n")
            tok = train_tokenizer(source_from_args(args), args.model_prefix, args.vocab_size, args.model_type,
                                  args.character_coverage, args.byte_fallback, tuple(args.user_defined_symbols),
                                  args.input_sentence_size, args.seed)
            print(f"wrote {args.model_prefix}.model ({tok.vocab_size} pieces)")
        elif args.command == "encode":
            print(" ".join(map(str, load_tokenizer(args.model).tokenize(" ".join(args.text)))))
        else:
            tokenizer = load_tokenizer(args.model)
            print(tokenizer.detokenize(token_ids(args.text, tokenizer)))
    except DataError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
