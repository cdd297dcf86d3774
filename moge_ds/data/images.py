"""Image classification data: Fashion-MNIST (Debian IDX files), HF image datasets, ImageFolder.

Everything is loaded to one uint8 tensor ``[N, C, H, W]`` plus int64 labels ``[N]``: these
datasets are small, and in-memory tensors make batches, augmentation and the "minor
transformation" views used by the invariance analysis plain tensor ops (no torchvision).
"""

from __future__ import annotations

import gzip
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moge_ds.data.documents import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HELP = ("Fashion-MNIST comes from Debian's dataset-fashion-mnist package: "
                      "`sudo apt-get install -y dataset-fashion-mnist` (or `make system-deps`)")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, C, H, W] uint8
    labels: torch.Tensor  # [N] int64
    classes: tuple[str, ...]


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the MNIST container format."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist. {FASHION_MNIST_HELP}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise DataError(f"{path} holds {body.size} values but its header says {shape}: truncated file")
    return body.reshape(shape)


def fashion_mnist(split: str, root: str = FASHION_MNIST_DIR) -> ImageSet:
    """``split`` is "train" (60k) or "test" (10k)."""
    stem = {"train": "train", "test": "t10k"}.get(split)
    if stem is None:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    images = read_idx(Path(root) / f"{stem}-images-idx3-ubyte.gz")
    labels = read_idx(Path(root) / f"{stem}-labels-idx1-ubyte.gz")
    return ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                    FASHION_MNIST_CLASSES)


def _pil_to_tensor(image, size: int | None) -> torch.Tensor:
    if size is not None:
        image = image.resize((size, size))
    array = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)


def image_folder(root: str, size: int | None = None) -> ImageSet:
    """``root/<class>/<image>``: classes are the sorted sub-directory names."""
    from PIL import Image

    class_dirs = sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
    if not class_dirs:
        raise DataError(f"{root} has no class sub-directories: expected {root}/<class>/<image files>")
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.iterdir()):
            try:
                images.append(_pil_to_tensor(Image.open(file), size))
            except OSError as err:
                raise DataError(f"{file} is not a readable image: {err}") from None
            labels.append(label)
    if len({tuple(i.shape) for i in images}) > 1:
        raise DataError(f"images under {root} differ in size: pass a size to resize them")
    return ImageSet(torch.stack(images), torch.tensor(labels), tuple(p.name for p in class_dirs))


def hf_images(name: str, split: str, image_key: str = "image", label_key: str = "label",
              size: int | None = None) -> ImageSet:
    """A Hugging Face image classification dataset (local path, or a hub name when online)."""
    from datasets import load_dataset

    dataset = load_dataset(name, split=split)
    for key in (image_key, label_key):
        if key not in dataset.column_names:
            raise DataError(f"dataset {name!r} has no column {key!r} (it has {dataset.column_names})")
    images = torch.stack([_pil_to_tensor(img, size) for img in dataset[image_key]])
    feature = dataset.features[label_key]
    classes = tuple(feature.names) if hasattr(feature, "names") else tuple(map(str, sorted(set(dataset[label_key]))))
    return ImageSet(images, torch.tensor(dataset[label_key], dtype=torch.int64), classes)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Training augmentation: a random crop after ``pad`` pixels of zero padding, and random horizontal flip."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, ), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, ), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(b, images.shape[1], h, w + 2 * pad)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(b, images.shape[1], h, w)
    cropped = cropped.gather(3, cols)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate by (dy, dx) pixels, filling with zeros: the deterministic "minor transformation"."""
    h, w = images.shape[-2:]
    out = torch.zeros_like(images)
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate about the centre by ``degrees`` (bilinear, zero fill); keeps the dtype."""
    theta = math.radians(degrees)
    matrix = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]])
    grid = F.affine_grid(matrix.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    rotated = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rotated.round().clamp(0, 255).to(images.dtype) if images.dtype == torch.uint8 else rotated
