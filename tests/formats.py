"""Tiny data sets written in each real on-disk format, for loading through the real code."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_cifar10(root: Path, per_batch: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-batches-py/ with five train batches and a test batch; returns (train images, labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = list(rng.integers(0, 10, per_batch))
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": data, b"filenames": []}, f)
        if name != "test_batch":
            images.append(data.reshape(-1, 3, 32, 32))
            labels += y
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_vis": 3072}, f)
    return np.concatenate(images), np.array(labels)


def write_cifar100(root: Path, n: int = 24, seed: int = 0) -> np.ndarray:
    """cifar-100-python/ train and test pickles with fine and coarse labels; returns train coarse labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    coarse_train = None
    for name in ("train", "test"):
        coarse = list(rng.integers(0, 20, n))
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": list(rng.integers(0, 100, n)),
            b"coarse_labels": coarse,
            b"filenames": [],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        coarse_train = coarse_train if coarse_train is not None else np.array(coarse)
    return coarse_train


def write_stl10(root: Path, n: int = 10, unlabeled: int = 3, seed: int = 0) -> np.ndarray:
    """stl10_binary/ with column-major image files; returns the train images as N x 3 x H x W."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    train = None
    for split, count in (("train", n), ("test", n), ("unlabeled", unlabeled)):
        images = rng.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # STL stores each channel column-major
        if split != "unlabeled":
            rng.integers(1, 11, count).astype(np.uint8).tofile(folder / f"{split}_y.bin")
        train = images if train is None else train
    return train


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, n: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    train = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    write_idx(root / "train-images-idx3-ubyte.gz", train)
    write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n // 2, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, n // 2))
    return train


def write_png_folder(
    root: Path, classes=("cat", "dog"), per_class: int = 3, size=(40, 30), seed: int = 0
) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / name / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths
