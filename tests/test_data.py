"""Tokenizer, preprocessing and megatron-core sampling on small corpora made here; image data."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from moge_ds.data.documents import DataError, SourceSpec, iter_documents
from moge_ds.data.images import augment, read_idx, rotate, shift
from moge_ds.data.preprocess import preprocess
from moge_ds.data.text import build_text_splits, check_indexed_dataset, lm_batch
from moge_ds.data.tokenizer import Tokenizer, train_tokenizer

def test_round_trip_and_special_ids(corpus):
    _, texts, _, tok = corpus
    for text in texts[:5] + ["unseen wörds ✓ and ünïcode", "def f(x):\n    return  x\n\n"]:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert (tok.pad, tok.eod, tok.vocab_size) == (0, 2, 300)


def test_bpe_and_user_symbols(corpus, tmp_path):
    _, _, spec, _ = corpus
    tok = train_tokenizer(spec, str(tmp_path / "bpe"), vocab_size=290, model_type="bpe",
                          user_defined_symbols=("<sep>", ))
    assert tok.sp.piece_to_id("<sep>") == 4 and "<sep>" in tok.detokenize(tok.tokenize("a <sep> b"))


def test_vocab_too_large_is_reported(corpus, tmp_path):
    _, _, spec, _ = corpus
    with pytest.raises(DataError, match="vocab_size 50000 is larger than this corpus supports"):
        train_tokenizer(spec, str(tmp_path / "big"), vocab_size=50000)


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_counts_match_independent_count(corpus, tmp_path, workers):
    root, texts, spec, tok = corpus
    stats = preprocess(spec, str(tok.path), str(tmp_path / "ds"), workers=workers, progress=False)
    want = sum(len(tok.sp.encode(t)) + 1 for t in texts)
    assert (stats.documents, stats.tokens) == (len(texts), want)
    dataset = check_indexed_dataset(str(tmp_path / "ds"))
    assert len(dataset) == len(texts)
    assert dataset[3].tolist() == tok.sp.encode(texts[3]) + [tok.eod]
    assert not list(tmp_path.glob("*.tmp*")), "temporary files left behind"


def test_multi_worker_output_identical(corpus, tmp_path):
    _, _, spec, tok = corpus
    for w in (1, 2):
        preprocess(spec, str(tok.path), str(tmp_path / f"w{w}"), workers=w, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()


def test_jsonl_and_parquet_inputs(corpus, tmp_path):
    _, texts, _, tok = corpus
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:4]))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": texts[4:7]}), tmp_path / "b.parquet")
    spec = SourceSpec((str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")), text_field="body")
    assert list(iter_documents(spec)) == texts[:7]


def test_blending_proportions_and_determinism(two_datasets, process_group):
    out, tok = two_datasets
    def build(seed):
        return build_text_splits([str(out / "a"), str(out / "b")], [0.25, 0.75], tok, 16, (2000, 50, 50),
                                 split="80,10,10", seed=seed, cache_dir=str(out / f"cache{seed}"))
    splits = build(5)
    share_b = np.mean(np.asarray(splits.train.dataset_index[:2000]) == 1)
    assert share_b == pytest.approx(0.75, abs=0.02)
    again = build(5)
    assert torch.equal(lm_batch(splits.train, 0, 8)["tokens"], lm_batch(again.train, 0, 8)["tokens"])
    other_seed = build(6)
    assert not torch.equal(lm_batch(splits.train, 0, 8)["tokens"], lm_batch(other_seed.train, 0, 8)["tokens"])


def test_resume_at_sample_index(two_datasets):
    out, tok = two_datasets
    splits = build_text_splits([str(out / "a")], None, tok, 16, (200, 20, 20), split="80,10,10",
                               cache_dir=str(out / "cache_resume"))
    full = [lm_batch(splits.train, i * 4, 4) for i in range(5)]
    resumed = lm_batch(splits.train, 3 * 4, 4)
    assert torch.equal(full[3]["tokens"], resumed["tokens"])
    batch = full[0]
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])


def test_bad_inputs(corpus, two_datasets, tmp_path):
    root, _, _, tok = corpus
    out, _ = two_datasets
    with pytest.raises(DataError, match="matches no file"):
        list(iter_documents(SourceSpec((str(tmp_path / "missing*.txt"), ))))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty.txt' holds no text"):
        list(iter_documents(SourceSpec((str(tmp_path / "empty.txt"), ))))
    (tmp_path / "latin1.txt").write_bytes("ok caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8: byte b'\\xe9' at offset 6"):
        list(iter_documents(SourceSpec((str(tmp_path / "latin1.txt"), ))))
    assert list(iter_documents(SourceSpec((str(tmp_path / "latin1.txt"), ), on_decode_error="replace"))) == \
        ["ok caf\ufffd"]
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(DataError, match="bad.jsonl line 2 is not JSON"):
        list(iter_documents(SourceSpec((str(tmp_path / "bad.jsonl"), ))))
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl line 1 has no field 'text' \(it has \['body'\]\)"):
        list(iter_documents(SourceSpec((str(tmp_path / "nofield.jsonl"), ))))
    with pytest.raises(DataError, match="seq_length 100000 is longer than the smallest split holds"):
        build_text_splits([str(out / "a")], None, tok, 100000, (10, 1, 1))
    with pytest.raises(DataError, match="does not exist"):
        build_text_splits([str(tmp_path / "nothing")], None, tok, 16, (10, 1, 1))
    truncated = tmp_path / "trunc"
    (truncated.with_suffix(".idx")).write_bytes((out / "a.idx").read_bytes())
    (truncated.with_suffix(".bin")).write_bytes((out / "a.bin").read_bytes()[:-10])
    with pytest.raises(DataError, match="trunc.bin has .* bytes but .*trunc.idx describes"):
        check_indexed_dataset(str(truncated))
    with pytest.raises(DataError, match="tokenizer model .* does not exist"):
        Tokenizer(tmp_path / "none.model")


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_truncation(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", array)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), array)
    with gzip.open(tmp_path / "t.gz", "wb") as f:
        f.write(struct.pack(">BBBBII", 0, 0, 8, 2, 5, 5) + bytes(10))
    with pytest.raises(DataError, match="holds 10 values but its header says"):
        read_idx(tmp_path / "t.gz")


def test_image_transforms():
    images = torch.randint(0, 256, (6, 1, 10, 10), dtype=torch.uint8)
    assert torch.equal(shift(images, 1, -2)[..., 1:, :-2], images[..., :-1, 2:])
    assert shift(images, 1, 0)[..., 0, :].eq(0).all()
    assert torch.equal(rotate(images, 0.0), images)
    quarter = rotate(images, 90.0)
    assert torch.equal(quarter, images.rot90(1, (2, 3))) or torch.equal(quarter, images.rot90(-1, (2, 3)))
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(0)))
