"""Data sources: each loads one data set from its real on-disk format into memory, once.

A source returns an `ImageSet`: uint8 images N x C x H x W and int64 labels (-1 where unknown).
Splits follow the evaluation protocols of the papers: "train", "test", "train+test", and
"unlabeled" where a data set has one (STL-10). Nothing is downloaded: a missing data set raises
`DataNotFoundError` naming the path looked in and how to get the data.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import threading
import warnings
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from clusterlab.errors import UserError


class DataNotFoundError(UserError, FileNotFoundError):
    """A data set's files are not where the source looked."""


class CorruptDataError(UserError, ValueError):
    """A data file or image exists but cannot be decoded."""


class UnreadableImagesError(CorruptDataError):
    """Images of a folder that cannot be decoded: all of them, as (path, reason) in `failures`;
    `listing` names the file they are listed in, once written."""

    def __init__(self, failures: list[tuple[str, str]], total: int, root, listing=None) -> None:
        self.failures, self.total, self.root, self.listing = failures, total, root, listing
        first, reason = failures[0]
        where = f" (all listed in {listing})" if listing else ""
        super().__init__(
            f"{len(failures)} of the {total} images under {root} cannot be read{where}: first {first}: "
            f"{reason}. "
            "Fix or remove them, or pass --data.on_error skip to leave them out."
        )


@dataclass
class ImageSet:
    images: Tensor  # uint8, N x C x H x W
    labels: Tensor  # int64, N; -1 where unknown
    classes: list[str]
    paths: list[str] | None = field(default=None, repr=False)  # per image, for folder sources

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.ndim == 4, self.images.shape
        assert self.labels.shape == (len(self.images),), (self.labels.shape, self.images.shape)

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def concat(parts: list[ImageSet]) -> ImageSet:
        paths = None
        if all(p.paths is not None for p in parts):
            paths = [path for p in parts for path in p.paths]
        return ImageSet(
            torch.cat([p.images for p in parts]),
            torch.cat([p.labels for p in parts]),
            parts[0].classes,
            paths,
        )


class Source(ABC):
    """One data set on disk. Subclasses load single splits; "train+test" concatenates them."""

    name: str = ""
    classes: list[str] = []
    channels: int = 3  # of the decoded images
    splits: tuple[str, ...] = ("train", "test")
    default_root: str | None = None
    how_to_get: str = ""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        root = root if root is not None else self.default_root
        self.root = Path(os.path.expanduser(str(root))) if root is not None else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load(self, split: str) -> ImageSet:
        if split == "train+test" and "train+test" not in self.splits:  # every labelled split there is
            return ImageSet.concat([self.load(part) for part in ("train", "test") if part in self.splits])
        if split not in self.splits:
            raise ValueError(
                f"{self.name} has no split {split!r}; it has {', '.join(self.splits)}"
                + ("" if "train" not in self.splits else ", train+test")
            )
        return self._load(split)

    @abstractmethod
    def _load(self, split: str) -> ImageSet:
        """Read one split from its on-disk format."""

    def _require(self, *paths: Path) -> None:
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise DataNotFoundError(
                f"{self.name}: no data set at {self.root} (looked for {', '.join(str(p) for p in missing)}). "
                f"{self.how_to_get}"
            )


class Digits(Source):
    """scikit-learn's 8x8 handwritten digits (1,797 images, bundled with scikit-learn: no set-up).

    It is a single collection (the UCI optdigits test set), so it offers one split: train+test.
    """

    name = "digits"
    classes = [str(d) for d in range(10)]
    channels = 1
    splits = ("train+test",)

    def _load(self, split: str) -> ImageSet:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        return ImageSet(torch.from_numpy(images), torch.from_numpy(digits.target).long(), self.classes)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not, as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise CorruptDataError(f"cannot read IDX file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CorruptDataError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise CorruptDataError(f"{path}: header declares shape {shape} but holds {body.size} bytes")
    return body.reshape(shape)


class FashionMNIST(Source):
    """Fashion-MNIST (Xiao et al. 2017): 60k train + 10k test 28x28 grey images, IDX files."""

    name = "fashion_mnist"
    channels = 1
    classes = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]
    default_root = "/usr/share/datasets/fashion-mnist"
    how_to_get = (
        "On Debian/Ubuntu: apt-get install dataset-fashion-mnist (files in "
        "/usr/share/datasets/fashion-mnist); "
        "or download the four *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist "
        "into a folder and pass it as --data.root."
    )
    _prefix = {"train": "train", "test": "t10k"}

    def _file(self, stem: str) -> Path:
        plain = self.root / stem
        return plain if plain.exists() else self.root / f"{stem}.gz"

    def _load(self, split: str) -> ImageSet:
        images = self._file(f"{self._prefix[split]}-images-idx3-ubyte")
        labels = self._file(f"{self._prefix[split]}-labels-idx1-ubyte")
        self._require(images, labels)
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or y.shape != (x.shape[0],):
            raise CorruptDataError(f"{images} and {labels} disagree: shapes {x.shape} and {y.shape}")
        return ImageSet(
            torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64)), self.classes
        )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR batch holds (dicts, lists, strings, numbers and numpy arrays) and
    nothing else: a pickle names functions that unpickling calls, so a planted file could run code;
    any other name is refused."""

    _allowed = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes made under Python 2 (the CIFAR files)
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch does not hold")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise CorruptDataError(f"cannot read CIFAR batch {path}: {err}") from err
    if not isinstance(batch, dict):
        raise CorruptDataError(
            f"cannot read CIFAR batch {path}: it holds a {type(batch).__name__}, not a dict"
        )
    return batch


class CIFAR10(Source):
    """CIFAR-10 (python version): 50k train + 10k test 32x32 colour images, 10 classes."""

    name = "cifar10"
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    how_to_get = (
        "Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it "
        "(it unpacks to cifar-10-batches-py/), then pass the folder holding it as --data.root."
    )
    folder = "cifar-10-batches-py"
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    label_key = b"labels"

    def _dir(self) -> Path:
        return self.root if (self.root / self.files["test"][0]).exists() else self.root / self.folder

    def _load(self, split: str) -> ImageSet:
        if self.root is None:
            raise DataNotFoundError(f"{self.name}: no --data.root given. {self.how_to_get}")
        paths = [self._dir() / f for f in self.files[split]]
        self._require(*paths)
        images, labels = [], []
        for path in paths:
            batch = _unpickle(path)
            if b"data" not in batch or self.label_key not in batch:
                raise CorruptDataError(f"{path} is not a {self.name} batch (keys {sorted(batch)})")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[self.label_key], dtype=np.int64))
        return ImageSet(
            torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), self.classes
        )


class CIFAR20(CIFAR10):
    """CIFAR-100 evaluated on its 20 super-classes ("CIFAR-20"), the clustering papers' protocol."""

    name = "cifar20"
    classes = [
        "aquatic mammals",
        "fish",
        "flowers",
        "food containers",
        "fruit and vegetables",
        "household electrical devices",
        "household furniture",
        "insects",
        "large carnivores",
        "large man-made outdoor things",
        "large natural outdoor scenes",
        "large omnivores and herbivores",
        "medium-sized mammals",
        "non-insect invertebrates",
        "people",
        "reptiles",
        "small mammals",
        "trees",
        "vehicles 1",
        "vehicles 2",
    ]
    how_to_get = (
        "Download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it "
        "(it unpacks to cifar-100-python/), then pass the folder holding it as --data.root."
    )
    folder = "cifar-100-python"
    files = {"train": ["train"], "test": ["test"]}
    label_key = b"coarse_labels"


class STL10(Source):
    """STL-10 binaries: 5k train + 8k test labelled 96x96 images, and 100k unlabeled ones."""

    name = "stl10"
    classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    splits = ("train", "test", "unlabeled")
    how_to_get = (
        "Download http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz and extract it "
        "(it unpacks to stl10_binary/), then pass the folder holding it as --data.root."
    )

    def _load(self, split: str) -> ImageSet:
        if self.root is None:
            raise DataNotFoundError(f"{self.name}: no --data.root given. {self.how_to_get}")
        folder = self.root if (self.root / "test_X.bin").exists() else self.root / "stl10_binary"
        images_path = folder / f"{split}_X.bin"
        labels_path = None if split == "unlabeled" else folder / f"{split}_y.bin"
        self._require(images_path, *([labels_path] if labels_path else []))
        raw = np.fromfile(images_path, dtype=np.uint8)
        if raw.size % (3 * 96 * 96):
            raise CorruptDataError(f"{images_path}: {raw.size} bytes is not a whole number of 3x96x96 images")
        images = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)  # stored column-major
        if labels_path is None:
            labels = np.full(len(images), -1, dtype=np.int64)
        else:
            labels = np.fromfile(labels_path, dtype=np.uint8).astype(np.int64) - 1  # 1-based on disk
            if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= 10:
                raise CorruptDataError(f"{labels_path}: expected {len(images)} labels in 1..10")
        return ImageSet(
            torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), self.classes
        )


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


# The most pixels one image may be decoded at (`clusterlab cluster --max_pixels`, `--data.max_pixels`).
# 120 MP is above every camera's full-size photo but the rarest (102-MP medium format, 108-MP phones)
# and a 600-dpi A3 scan (70 MP), below PIL's own "decompression bomb" error (179 MP), and a PNG or
# TIFF of that size holds at most about 1 GB while it is decoded (BYTES_PER_PIXEL). JPEGs count at
# the reduced scale they are decoded at (PIL's draft: 1/2, 1/4 or 1/8 of each side, never below the
# working size), so a photo from any camera passes; the limit stops the small files that decode to
# gigabytes (a 20,000 x 20,000 PNG of one colour is a few KB on disk and 1.6 GB decoded).
DEFAULT_MAX_PIXELS = 120_000_000
# Worst case per decoded pixel: the decoded image (PIL keeps at most 4 bytes a pixel: RGB is
# stored as RGBX) and its converted copy (4 more) when its mode is not the one wanted.
BYTES_PER_PIXEL = 8
# What the decodes running at one time in a process may hold together, whatever the number of
# decoding threads (see _DecodeMemory): 8 threads of 120-MP PNGs would otherwise hold 7.7 GB.
DECODE_MEMORY = 2 * 2**30


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than the limit; its text is the reason a
    skipped-files list gives ("20000 x 20000 = 400,000,000 pixels, over --max_pixels ...")."""


class _DecodeMemory:
    """A counting semaphore in bytes: a decode waits until the decodes already running leave room
    for its pixels (known from the header, before decoding), so that the threads of a process
    never hold more than DECODE_MEMORY at once. Small images take a sliver and run side by side;
    an image larger than the whole budget waits for the others and then runs alone."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self.changed = threading.Condition()

    @contextmanager
    def hold(self, amount: int):
        amount = min(amount, self.total)
        with self.changed:
            self.changed.wait_for(lambda: self.used + amount <= self.total)
            self.used += amount
        try:
            yield
        finally:
            with self.changed:
                self.used -= amount
                self.changed.notify_all()


_decode_memory = _DecodeMemory(DECODE_MEMORY)


def _fresh_decode_memory() -> None:  # a forked DataLoader worker starts with the budget free
    global _decode_memory
    _decode_memory = _DecodeMemory(DECODE_MEMORY)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_decode_memory)


def decode_image(path: Path, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image, resize its shorter side to `size` and centre-crop a square: C x size x size.

    The header is read first (PIL.Image.open decodes nothing): a JPEG is set to decode at the
    smallest scale that still covers `size` (PIL's draft), and an image of more than `max_pixels`
    pixels is refused before a byte of it is decoded (CorruptDataError, caused by an
    ImageTooLargeError that says its size). PIL's own process-wide limit is turned off: it raises
    without the image's size past 179 MP and warns past 89 MP whatever `max_pixels` says, and this
    check, per call, replaces it."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # the check below is the limit (see the docstring)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.format == "JPEG":
                scale = size / max(1, min(width, height))
                img.draft(None, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
            w, h = img.size
            if min(w, h) < 1:
                raise ValueError(f"the image is {width} x {height} pixels: nothing to decode")
            if w * h > max_pixels:
                drafted = f" (decoded at {w} x {h} = {w * h:,})" if (w, h) != (width, height) else ""
                raise ImageTooLargeError(
                    f"{width} x {height} = {width * height:,} pixels{drafted}, over --max_pixels "
                    f"{max_pixels:,}"
                )
            with _decode_memory.hold(w * h * BYTES_PER_PIXEL):
                mode = "L" if channels == 1 else "RGB"
                img = img.convert(mode) if img.mode != mode else img
                scale = size / min(w, h)
                img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            array = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptDataError(f"cannot read image {path}: {err}") from err
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


class ImageFolder(Source):
    """Any folder tree of images (ImageNet-10, ImageNet-Dogs, Tiny-ImageNet, your own photos).

    With at least two sub-folders, each names the class of the images below it (images directly
    under a split folder have no label, -1); a single sub-folder is no class structure, and every
    image is unlabeled. A root with `train/` and `test/` (or `val/`) folders offers those splits;
    otherwise the whole root is the train split. Images beside the split folders (`cat/` next to
    `train/`, or `val/` next to `test/`) are in no split: the first listing of a split says so in
    one line on stdout, naming them (`unread()`), unless `tell_unread` is False (`clusterlab
    cluster` reads them too). Images are resized (shorter side) and centre-cropped to
    `image_size`, decoded in `num_workers` threads; an image of more than `max_pixels` pixels is
    not decoded (`decode_image`) and counts as unreadable.
    `on_error="skip"` reports unreadable images by path and leaves them out; "raise" stops, after
    reading them all, with their number and the first of them (`CorruptDataError.failures`: all).
    """

    name = "image_folder"
    how_to_get = "Point --data.root at a folder of images (class sub-folders optional)."

    def __init__(
        self,
        root=None,
        image_size: int = 64,
        channels: int = 3,
        on_error: str = "raise",
        num_workers: int = 8,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(root)
        if self.root is None:
            raise DataNotFoundError(f"{self.name}: no --data.root given. {self.how_to_get}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.image_size, self.channels, self.on_error, self.num_workers = (
            image_size,
            channels,
            on_error,
            num_workers,
        )
        self.max_pixels = max_pixels
        self.skipped: list[tuple[str, str]] = []
        self.tell_unread = True  # say once which images lie in no split (see the class docstring)

    def _split_dirs(self) -> dict[str, Path]:
        self._require(self.root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"{self.name}: {self.root} is not a folder. {self.how_to_get}")
        dirs = {"train": self.root / "train" if (self.root / "train").is_dir() else self.root}
        for name in ("test", "val"):
            if (self.root / name).is_dir():
                dirs["test"] = self.root / name
                break
        return dirs

    @property
    def splits(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._split_dirs())

    @property
    def classes(self) -> list[str]:  # type: ignore[override]
        names = set()
        for folder in self._split_dirs().values():
            names.update(
                p.name for p in folder.iterdir() if p.is_dir() and p.name not in ("train", "test", "val")
            )
        return sorted(names) if len(names) >= 2 else []  # one sub-folder is no class structure

    def _images_in(self, folder: Path) -> list[Path]:
        found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if folder == self.root:  # a root without split folders: don't descend into train/test/val
            found = [p for p in found if p.relative_to(folder).parts[0] not in ("train", "test", "val")]
        return found

    def unread(self) -> list[Path]:
        """The images under the root that no split reads, sorted: those beside `train/` (the
        root is then no split itself), and `val/` when `test/` is the test split."""
        read = {p for folder in set(self._split_dirs().values()) for p in self._images_in(folder)}
        every = [p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        return sorted(p for p in every if p not in read)

    def _tell_unread(self) -> None:
        """One line on stdout, once, naming the folders (and loose files) that no split reads: a
        layout that reads 60 of 66 images must not do it silently."""
        if not self.tell_unread:
            return
        self.tell_unread = False
        unread = self.unread()
        if not unread:
            return
        tops: dict[str, int] = {}
        for p in unread:
            parts = p.relative_to(self.root).parts
            top = f"{parts[0]}/" if len(parts) > 1 else "files directly in the root"
            tops[top] = tops.get(top, 0) + 1
        splits = " and ".join(
            f"{folder.relative_to(self.root).as_posix()}/"
            if folder != self.root
            else "the root's other images"
            for folder in dict.fromkeys(self._split_dirs().values())
        )
        print(
            f"{self.name}: {self.root}: {splits} read as the splits; "
            + ", ".join(f"{top} ({n} image{'s' if n != 1 else ''})" for top, n in tops.items())
            + " beside them are in no split and are skipped (move them into a split folder to use them)",
            flush=True,
        )

    def files(self, split: str) -> list[Path]:
        folder = self._split_dirs()[split]
        self._tell_unread()
        found = self._images_in(folder)
        if not found:
            raise DataNotFoundError(
                f"{self.name}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}"
            )
        return sorted(found)

    def listing(self, split: str) -> tuple[list[Path], torch.Tensor]:
        """The split's image files in sorted order, and their labels (-1 outside class folders)."""
        if split == "train+test":
            parts = [self.listing(part) for part in ("train", "test") if part in self.splits]
            return [p for paths, _ in parts for p in paths], torch.cat([labels for _, labels in parts])
        folder, index = self._split_dirs()[split], {name: i for i, name in enumerate(self.classes)}
        paths = self.files(split)
        labels = [
            index.get(p.relative_to(folder).parts[0], -1) if len(p.relative_to(folder).parts) > 1 else -1
            for p in paths
        ]
        return paths, torch.tensor(labels, dtype=torch.long)

    def decode(self, path: Path) -> np.ndarray | None:
        """One image as C x size x size uint8; None (reported by path) when unreadable and on_error="skip"."""
        try:
            return decode_image(path, self.image_size, self.channels, self.max_pixels)
        except CorruptDataError as err:
            if self.on_error == "raise":
                raise
            warnings.warn(f"skipping unreadable image {path}: {err.__cause__}", stacklevel=2)
            self.skipped.append((str(path), str(err.__cause__)))
            return None

    def _try_decode(self, path: Path) -> np.ndarray | str:
        try:
            return decode_image(path, self.image_size, self.channels, self.max_pixels)
        except CorruptDataError as err:
            return str(err.__cause__) or "unreadable"

    def _load(self, split: str) -> ImageSet:
        paths, labels = self.listing(split)
        with ThreadPoolExecutor(max(1, self.num_workers)) as pool:
            arrays = list(pool.map(self._try_decode, paths))
        failures = [(str(p), a) for p, a in zip(paths, arrays) if isinstance(a, str)]
        if failures and self.on_error == "raise":
            raise UnreadableImagesError(failures, len(paths), self.root)
        for path, reason in failures:
            warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=2)
        self.skipped.extend(failures)
        kept = [i for i, a in enumerate(arrays) if not isinstance(a, str)]
        if not kept:
            raise CorruptDataError(
                f"{self.name}: none of the {len(paths)} images of split {split} could be read"
            )
        return ImageSet(
            torch.from_numpy(np.stack([arrays[i] for i in kept])),
            labels[kept],
            self.classes,
            [str(paths[i]) for i in kept],
        )


SOURCES: dict[str, type[Source]] = {
    s.name: s for s in (Digits, FashionMNIST, CIFAR10, CIFAR20, STL10, ImageFolder)
}
