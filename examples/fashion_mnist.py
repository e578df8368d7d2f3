"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, read with gzip and torch alone.

`apt-get install -y dataset-fashion-mnist` puts the four IDX files in /usr/share/datasets/fashion-mnist
(`dpkg -L dataset-fashion-mnist` lists them); set FASHION_MNIST_DIR to read them from elsewhere.
The end-to-end example, the fine-tuning benchmark and the tests share this reader, and the CLI can
take its callables as data: `--data examples/fashion_mnist.py:train_batches`.

IDX format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code (0x08 = uint8), the number
of dimensions, each dimension as a big-endian int32, then the values in C order.
"""

from __future__ import annotations

import gzip
import math
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530  # of the training images, in [0, 1]
INSTALL_HINT = "install it with `apt-get update && apt-get install -y dataset-fashion-mnist`, or set FASHION_MNIST_DIR"


def data_dir() -> Path:
    return Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))


def available() -> bool:
    """Whether all four IDX files are where `data_dir()` says."""
    return all((data_dir() / name).is_file() for pair in FILES.values() for name in pair)


def missing() -> bool:
    """True, after saying where the data was looked for and how to install it (on stderr), when it is not there."""
    if available():
        return False
    print(f"Fashion-MNIST not found in {data_dir()}: {INSTALL_HINT}", file=sys.stderr)
    return True


def read_idx(path: Path) -> Tensor:
    """The uint8 tensor an IDX(.gz) file holds, in the shape its header gives."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (header {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} ({math.prod(dims)} values), file holds {len(raw) - offset}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=offset).reshape(dims)


def load(split: str = "train", limit: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(images, labels): float32 (N, 1, 28, 28) normalised to mean 0 / std 1, int64 (N,); the first `limit`."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    if not available():
        raise FileNotFoundError(f"Fashion-MNIST is not in {data_dir()}: {INSTALL_HINT}")
    image_file, label_file = (data_dir() / name for name in FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = (images.unsqueeze(1).float() / 255.0 - MEAN) / STD
    return images, labels.long()


class Batches:
    """Re-iterable (images, labels) batches; shuffled afresh on every pass when `shuffle` (seeded, reproducible).

    `with_labels=False` yields images alone (what distillation and calibration need).
    """

    def __init__(
        self, images: Tensor, labels: Tensor, batch_size: int = 128, shuffle: bool = False, seed: int = 0,
        with_labels: bool = True,
    ) -> None:  # fmt: skip
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.with_labels = batch_size, shuffle, with_labels
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self) -> Iterator:
        n = len(self.images)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield (self.images[index], self.labels[index]) if self.with_labels else self.images[index]

    def inputs_only(self) -> "Batches":
        return Batches(self.images, self.labels, self.batch_size, self.shuffle, self.generator.initial_seed(), False)


def batches(
    split: str = "train", batch_size: int = 128, limit: Optional[int] = None, shuffle: Optional[bool] = None,
    seed: int = 0, with_labels: bool = True,
) -> Batches:  # fmt: skip
    """Batches of one split; the training split is shuffled unless told otherwise."""
    images, labels = load(split, limit)
    return Batches(images, labels, batch_size, split == "train" if shuffle is None else shuffle, seed, with_labels)


def train_batches() -> Batches:
    """All 60,000 training images with labels, 128 a batch: a `--data` callable for the CLI."""
    return batches("train")


def train_images() -> Batches:
    """All 60,000 training images without labels (distillation or calibration only)."""
    return batches("train", with_labels=False)


@torch.no_grad()
def accuracy(model: nn.Module, data: Batches) -> float:
    """Top-1 accuracy in percent, in eval mode (the model's mode is put back after)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in data:
        correct += int((model(images).argmax(1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return 100.0 * correct / total
