"""Tokenizer, preprocessing and megatron-core sampling on small corpora made here; image data."""

import gc
import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch

from moge_ds.data.documents import DataError, SourceSpec, iter_documents
from moge_ds.data.images import augment, read_idx, rotate, shift
from moge_ds.data.preprocess import preprocess
from moge_ds.config import load_config
from moge_ds.data.text import (build_text_splits, check_indexed_dataset, check_splits, document_lengths, lm_batch,
                               one_epoch_samples, working_split)
from moge_ds.data.tokenizer import Tokenizer, train_tokenizer
from moge_ds.tasks import LanguageModelling
from tests.launching import make_corpus, train

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


# Words over disjoint letters (a-m, n-z): no token but the space, ".", newline and EOD is in both corpora,
# so a sample's tokens say which corpus it came from.
DISJOINT_WORDS = {"a": "bead cafe dial glade hijack kale lime meal blade jagged".split(),
                  "b": "tory worst pony sun trout story wry snow ruts onus".split()}


@pytest.fixture(scope="module")
def disjoint_pair(tmp_path_factory):
    """Indexed datasets "a" and "b" of 30 documents each over DISJOINT_WORDS, one tokenizer for both,
    and the token ids found in one corpus only."""
    root = tmp_path_factory.mktemp("disjoint")
    rng = np.random.default_rng(0)
    for name, words in DISJOINT_WORDS.items():
        (root / name).mkdir()
        for d in range(30):
            lines = [" ".join(rng.choice(words, 8)) + "." for _ in range(5)]
            (root / name / f"{d}.txt").write_text("\n".join(lines) + "\n")
    tok = train_tokenizer(SourceSpec((str(root / "*" / "*.txt"), )), str(root / "tok"), vocab_size=300,
                          input_sentence_size=0)
    ids = {}
    for name in DISJOINT_WORDS:
        preprocess(SourceSpec((str(root / name / "*.txt"), )), str(tok.path), str(root / name), progress=False)
        ids[name] = set(np.fromfile(root / f"{name}.bin", dtype=np.uint16).tolist())  # 300 ids: 2 bytes each
    return root, tok, {"a": ids["a"] - ids["b"], "b": ids["b"] - ids["a"]}


def test_blend_follows_the_weights(disjoint_pair, process_group):
    """data.weights [3, 1] through the training task (the path that crashed): of every prefix of the
    training sample stream, a quarter comes from b. megatron-core blends by a deterministic greedy schedule
    (each sample goes to the dataset furthest below its share), so every prefix of n samples is within one
    sample of 0.75 n; sampling at random would be ~12 samples off at n = 800."""
    root, tok, only = disjoint_pair
    config = load_config(None, (f"data.prefixes=[{root / 'a'},{root / 'b'}]", "data.weights=[3,1]",
                                f"data.tokenizer={tok.path}", "model.seq_length=16", "data.split=80,10,10"))
    task = LanguageModelling(config, micro_batch=4, rank=0, world=1, total_micro_batches=200,
                             device=torch.device("cpu"))
    sources = []
    for consumed in range(0, 800, 4):
        for sample in task.train_batch(consumed)["tokens"].tolist():
            found = [name for name in "ab" if only[name] & set(sample)]
            assert len(found) == 1, f"sample {len(sources)} holds tokens of {found or 'neither corpus'}"
            sources.append(found[0])
    from_a = np.cumsum(np.asarray(sources) == "a")
    assert from_a[-1] == 600
    assert np.abs(from_a - 0.75 * np.arange(1, 801)).max() <= 1


@pytest.mark.slow
def test_blended_training_on_two_ranks(workspace, tmp_path):
    """data.weights with two prefixes trains on 2 real ranks (every rank died of SIGSEGV), and the
    valid split is sized by one pass over both prefixes' documents."""
    (tmp_path / "corpus").mkdir()
    make_corpus(tmp_path / "corpus", docs=40, seed=3)
    preprocess(SourceSpec((str(tmp_path / "corpus" / "*.txt"), )), str(workspace / "tok.model"),
               str(tmp_path / "b"), progress=False)
    prefixes = [str(workspace / "text"), str(tmp_path / "b")]
    out, history = train(workspace, "blended", "train.steps=3", f"data.prefixes=[{','.join(prefixes)}]",
                         "data.weights=[3,1]", "train.final_eval=[valid]")
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in history if "loss" in r)
    valid_samples = one_epoch_samples(prefixes, "80,10,10", 32)[1]
    assert valid_samples > one_epoch_samples(prefixes[:1], "80,10,10", 32)[1]
    # megatron-core rounds each prefix's share of the split up: ceil(3/4 n) + ceil(1/4 n) samples.
    blended = math.ceil(0.75 * valid_samples) + math.ceil(0.25 * valid_samples)
    assert json.loads((out / "metrics.json").read_text())["valid"]["tokens"] == blended * 32


def test_document_lengths_outlive_the_index(two_datasets):
    """The lengths are a copy: reading them after megatron's reader has closed its mapping is safe."""
    out, _ = two_datasets
    lengths = document_lengths(str(out / "a"))
    assert lengths.flags.owndata
    gc.collect()
    assert lengths.sum() * 2 == (out / "a.bin").stat().st_size  # uint16 tokens


def test_a_split_that_works_is_suggested(two_datasets):
    out, _ = two_datasets
    lengths = document_lengths(str(out / "a"))
    assert len(lengths) == 40 and lengths.min() > 16
    # 1 % of 40 documents rounds to none; any one document holds a sample, so the nearest working split
    # gives valid and test one document each.
    with pytest.raises(DataError, match="gives the test split 0 of 40 documents .* data.split=\"38,1,1\" works"):
        check_splits(lengths, "a", "98,1,1", 16)
    check_splits(lengths, "a", "38,1,1", 16)
    longer = int(lengths.sum())
    with pytest.raises(DataError, match=f"No data.split of these 40 documents \\({longer} tokens\\) gives"):
        check_splits(lengths, "a", "80,10,10", longer)


def splits_that_work(lengths: np.ndarray, split: str, seq_length: int) -> dict[str, float]:
    """Every split (as document counts) with the same zero shares as ``split`` that check_splits accepts,
    and its distance from ``split`` in document boundaries: the brute-force answer."""
    n, shares = len(lengths), [float(x) for x in split.split(",")]
    t1, t2 = n * shares[0] / sum(shares), n * (shares[0] + shares[1]) / sum(shares)
    found = {}
    for b1 in range(n + 1):
        for b2 in range(b1, n + 1):
            counts = (b1, b2 - b1, n - b2)
            if [c > 0 for c in counts] != [x > 0 for x in shares]:
                continue
            try:
                check_splits(lengths, "x", ",".join(map(str, counts)), seq_length)
            except DataError:
                continue
            found[",".join(map(str, counts))] = abs(b1 - t1) + abs(b2 - t2)
    return found


@pytest.mark.parametrize("seed", range(6))
def test_the_suggested_split_is_the_nearest_that_works(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, size=int(rng.integers(2, 14)))
    for split in ("98,1,1", "80,10,10", "1,1,1", "9,0,1", "1,1,0", "100,0,0", "0,3,1"):
        seq_length = int(rng.integers(1, lengths.sum() // 2 + 2))
        works = splits_that_work(lengths, split, seq_length)
        suggested = working_split(lengths, split, seq_length)
        if not works:
            assert suggested is None, (lengths, split, seq_length)
        else:
            assert works.get(suggested) == pytest.approx(min(works.values())), (lengths, split, seq_length, suggested)


def test_data_from_a_larger_tokenizer_is_refused(corpus, two_datasets, tmp_path):
    """Without the tokenizer record (data made before it existed), token ids past the vocabulary are
    caught at start-up, not by an IndexError in the middle of a step."""
    _, _, spec, _ = corpus
    out, tok = two_datasets
    small = train_tokenizer(spec, str(tmp_path / "small"), vocab_size=290, input_sentence_size=0)
    for suffix in (".bin", ".idx"):
        (tmp_path / f"old{suffix}").write_bytes((out / f"a{suffix}").read_bytes())
    largest = int(np.fromfile(out / "a.bin", dtype=np.uint16).max())
    assert largest >= small.vocab_size
    with pytest.raises(DataError, match=f"old.bin holds token id {largest}, but data.tokenizer .*small.model has 290"):
        build_text_splits([str(tmp_path / "old")], None, small, 16, (10, 1, 1), split="80,10,10",
                          cache_dir=str(tmp_path / "cache"))


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
