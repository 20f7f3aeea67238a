"""Fashion-MNIST from its idx files (60,000 training and 10,000 test images of 1x28x28, 10 classes).

The files are the original ones, gzip-compressed or not::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

By default they are read from the folder the Debian package ``dataset-fashion-mnist`` installs
(``apt-get install -y dataset-fashion-mnist``; nothing is downloaded). An idx file is a big-endian
header (two zero bytes, a type code, the number of dimensions, then each dimension as a uint32)
followed by the values; Fashion-MNIST's are unsigned bytes (type 0x08).
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Tuple

import numpy as np

from fracpass.errors import FracpassError

__all__ = ["DEFAULT_FOLDER", "INSTALL", "read_idx", "find_files", "read_folder"]

DEFAULT_FOLDER = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
STEMS = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08


def read_idx(path) -> np.ndarray:
    """The array an idx file holds (unsigned bytes), gzip-compressed or not (told by its first bytes)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise FracpassError(f"{path}: a damaged gzip file ({e}); reinstall it with {INSTALL}") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise FracpassError(f"{path}: not an idx file (it should start with two zero bytes, a type and a rank)")
    kind, rank = raw[2], raw[3]
    if kind != _UBYTE:
        raise FracpassError(f"{path}: idx type 0x{kind:02x}; the Fashion-MNIST files hold unsigned bytes (0x08)")
    header = 4 + 4 * rank
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    size = int(np.prod(shape)) if shape else 0
    if len(raw) - header != size:
        raise FracpassError(f"{path}: its header says {shape} ({size} bytes) but {len(raw) - header} bytes follow; "
                            f"the file is truncated or damaged (reinstall it with {INSTALL})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_files(folder) -> dict:
    """The four files in ``folder`` (``.gz`` or not); an error that names what is missing and how to get it."""
    folder = Path(folder)
    found, missing = {}, []
    for key, stem in STEMS.items():
        path = next((folder / n for n in (f"{stem}.gz", stem) if (folder / n).is_file()), None)
        if path is None:
            missing.append(stem)
        found[key] = path
    if missing:
        where = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)} (with or without .gz)"
        raise FracpassError(f"Fashion-MNIST: {folder} {where}. Install the data set with `{INSTALL}` (it puts the "
                            f"files in {DEFAULT_FOLDER}), or give --data FOLDER holding the four idx files")
    return found


def read_folder(folder) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images (N, 1, 28, 28) uint8, train labels (N,), test images, test labels) from ``folder``."""
    files = find_files(folder)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise FracpassError(f"Fashion-MNIST in {folder}: {split} images {images.shape} and labels {labels.shape} "
                                "do not pair up (expected (N, rows, cols) images and N labels)")
    return (arrays["train_images"][:, None], arrays["train_labels"].astype(np.int64),
            arrays["test_images"][:, None], arrays["test_labels"].astype(np.int64))
