"""Fixtures shared by the test modules, each built once per test run."""

import json

import numpy as np
import pytest

from moge_ds.data.documents import SourceSpec
from moge_ds.data.preprocess import preprocess
from moge_ds.data.tokenizer import train_tokenizer
from moge_ds.distributed import single_process_group
from tests.launching import REPO, make_corpus


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A tokenizer, an indexed corpus, a 2-class image folder and a small-batch CPU ds_config."""
    root = tmp_path_factory.mktemp("train")
    corpus = root / "corpus"
    corpus.mkdir()
    make_corpus(corpus, docs=200)
    spec = SourceSpec((str(corpus / "*.txt"), ))
    tok = train_tokenizer(spec, str(root / "tok"), vocab_size=300, input_sentence_size=0)
    preprocess(spec, str(tok.path), str(root / "text"), progress=False)
    ds = json.loads((REPO / "ds_configs/cpu.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    ds["scheduler"]["params"]["warmup_num_steps"] = 2
    (root / "ds.json").write_text(json.dumps(ds))
    make_image_folder(root / "images")
    return root


def make_image_folder(root, per_class=24):
    """Two classes of 28x28 greyscale PNGs: bright blob top-left vs bottom-right."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for corner in ("tl", "br"):
            folder = root / split / corner
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = rng.integers(0, 60, (28, 28), dtype=np.uint8)
                sl = slice(2, 12) if corner == "tl" else slice(16, 26)
                image[sl, sl] = 220
                Image.fromarray(image).save(folder / f"{i}.png")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """40 small documents and a 300-piece tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    texts = make_corpus(root)
    spec = SourceSpec((str(root / "*.txt"), ))
    tok = train_tokenizer(spec, str(root / "tok"), vocab_size=300, input_sentence_size=0)
    return root, texts, spec, tok


@pytest.fixture(scope="session")
def two_datasets(corpus, tmp_path_factory):
    """Two indexed datasets (a: the corpus, b: another one) for blending."""
    root, _, spec, tok = corpus
    out = tmp_path_factory.mktemp("indexed")
    other = tmp_path_factory.mktemp("other")
    make_corpus(other, docs=30, seed=1)
    preprocess(spec, str(tok.path), str(out / "a"), progress=False)
    preprocess(SourceSpec((str(other / "*.txt"), )), str(tok.path), str(out / "b"), progress=False)
    return out, tok


@pytest.fixture
def process_group():
    """A one-process torch.distributed group for the test (megatron-core's blending asks for a rank)."""
    with single_process_group():
        yield


def write_dense_export(out, vocab_size, tokenizer="", **model):
    """A dense model of ours (a GPT unless ``kind`` says; fresh weights, seed 0) written as an export
    to ``out``; returns the model."""
    from moge_ds.config import Config
    from moge_ds.export import write_native
    from moge_ds.models import build_model

    config = Config()
    config.model.vocab_size = vocab_size
    for key, value in {"dim": 32, "depth": 2, "heads": 2, "seq_length": 32, **model}.items():
        setattr(config.model, key, value)
    config.moe.placement, config.moe.padding, config.data.tokenizer = "none", "circular", tokenizer
    config.train.seed = 0
    dense = build_model(config, vocab_size).eval()
    out.mkdir()
    write_native(dense, config, out, out, {"step": 0, "source": "tests"})
    return dense


@pytest.fixture(scope="session")
def dense_gpt(tmp_path_factory):
    """A dense GPT export of ours (3 blocks, vocabulary 64) and its model."""
    path = tmp_path_factory.mktemp("gpt") / "dense"
    return path, write_dense_export(path, 64, depth=3)
