"""The folder, walked once and decoded once: a uint8 memmap that every epoch reads batches from.

    <out>/cache/images.u8     N x C x S x S uint8, row i = the i-th readable image of the sorted walk
    <out>/cache/index.json    what the rows are: paths (relative to the folder), labels, classes,
                              the unreadable files with their reasons, and the key of the folder's state

Decoding (PIL, resize of the shorter side to S, centre crop; `clusterlab.data.sources.decode_image`,
the decoder `predict` uses too, so both see the same pixels) runs in a thread pool, a chunk of
files at a time, written straight into the memmap: neither the decoded folder nor the
list of pending results is ever held in memory whole. Training then indexes the memmap a batch
at a time, so the operating system's page cache, not the process, holds what is read; a
100,000-image folder at 32 px is a 307 MB file.

The cache is reused when the folder has not changed: the key hashes every file's relative path,
size and modification time with the decoded size and channels.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clusterlab.data.sources import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    CorruptDataError,
    ImageFolder,
    ImageSet,
    decode_image,
)
from clusterlab.errors import UserError

_FORMAT = 2  # bump when the layout of the cache or the decoding changes (2: JPEGs drafted, --max_pixels)
_CHUNK = 256  # files decoded per round trip through the pool


class FolderError(UserError):
    """The folder to group cannot be used: missing, empty, or without a readable image."""


@dataclass
class Scan:
    """The image files of a folder in the order of a sorted walk, with their class labels
    (the top sub-folder when there are at least two, as `--data.dataset image_folder` reads
    them; -1 otherwise). Labels only ever report metrics. Every image under the folder is in
    it: those beside `train/` and `test/` folders, which no split of `--data.dataset
    image_folder` reads, come last, unlabelled (grouping a folder is not split by split)."""

    root: Path
    paths: list[Path]
    labels: torch.Tensor
    classes: list[str]

    def relative(self, path: Path | str) -> str:
        return Path(path).relative_to(self.root).as_posix()


def scan(root: Path) -> Scan:
    """Walk the folder; a missing, empty or image-less folder is a FolderError that says so."""
    if not root.exists():
        raise FolderError(f"the folder {root} does not exist. Pass the folder that holds your images.")
    if not root.is_dir():
        raise FolderError(f"{root} is a file, not a folder. Pass the folder that holds your images.")
    source = ImageFolder(root)
    source.tell_unread = False  # read here too, not skipped: see Scan
    paths, labels = [], [torch.empty(0, dtype=torch.long)]
    for split in source.splits:  # train, and test when the folder has one
        try:
            listed, listed_labels = source.listing(split)
        except UserError:  # a split folder without images: the others may have some
            continue
        paths += listed
        labels.append(listed_labels)
    beside = source.unread()
    paths += beside
    labels = torch.cat([*labels, torch.full((len(beside),), -1, dtype=torch.long)])
    if not paths:  # no image file: say what is there instead
        others = Counter(p.suffix.lower() or p.name for p in root.rglob("*") if p.is_file())
        found = (
            (", ".join(f"{n} {kind}" for kind, n in others.most_common(5)) + " files")
            if others
            else "nothing"
        )
        raise FolderError(
            f"no images under {root} (found {found}). It needs files ending in "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}, in it or in its sub-folders."
        )
    return Scan(root, paths, labels, source.classes)


@dataclass
class DecodedFolder:
    """The readable images of a scan, as a memmap-backed ImageSet, and the unreadable ones."""

    images: ImageSet  # images: torch view of `memmap` (no copy); paths: absolute
    skipped: list[tuple[str, str]]  # (path relative to the folder, reason)
    reused: bool  # the cache was already there
    seconds: float
    memmap: np.memmap


def folder_key(found: Scan, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    digest = hashlib.sha256(f"{_FORMAT}:{size}:{channels}:{max_pixels}".encode())
    for path in found.paths:
        try:
            stat = path.stat()
            digest.update(f"\0{found.relative(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"\0{found.relative(path)}\0gone".encode())
    return digest.hexdigest()


def decode(
    found: Scan,
    cache: Path,
    size: int,
    channels: int = 3,
    reuse: Path | None = None,
    workers: int | None = None,
    progress=None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedFolder:
    """Decode every image of the scan into `cache` (a folder), or take the cache at `reuse` when it
    holds this very folder (hard-linked, so nothing is copied). `progress(done, total)` is called
    after every chunk. An image of more than `max_pixels` pixels is skipped, with its size as the
    reason, before it is decoded; the decodes running at once hold at most about
    `sources.DECODE_MEMORY` bytes, whatever `workers` is (`decode_image`)."""
    started = time.time()
    cache.mkdir(parents=True, exist_ok=True)
    key = folder_key(found, size, channels, max_pixels)
    index = _reusable(reuse, key) if reuse is not None else None
    reused = index is not None
    if reused:
        for name in ("images.u8", "index.json"):
            _link_or_copy(reuse / name, cache / name)
    else:
        index = _decode_into(
            found,
            cache,
            size,
            channels,
            key,
            workers or min(8, 2 * (os.cpu_count() or 1)),
            progress,
            max_pixels,
        )
        (cache / "index.json").write_text(json.dumps(index) + "\n")
    skipped = [tuple(s) for s in index["skipped"]]
    count = len(index["paths"])
    if count == 0:
        first, reason = skipped[0]
        raise FolderError(
            f"none of the {len(skipped)} image files under {found.root} can be read (first: {first}: "
            f"{reason}). "
            "Check that they are images (png, jpg, webp, bmp, tiff) and not truncated."
        )
    shape = (count, channels, size, size)
    # Copy-on-write: a writable array for torch (which warns on read-only memory) that never
    # writes back to the file; pages are read from disk as batches index them.
    array = np.memmap(cache / "images.u8", dtype=np.uint8, mode="c", shape=shape)
    images = ImageSet(
        torch.from_numpy(array),
        torch.tensor(index["labels"], dtype=torch.long),
        found.classes,
        [str(found.root / p) for p in index["paths"]],
    )
    return DecodedFolder(images, skipped, reused, time.time() - started, array)


def _reusable(folder: Path, key: str) -> dict | None:
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return index if index.get("key") == key and (folder / "images.u8").is_file() else None


def _link_or_copy(source: Path, target: Path) -> None:
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _try_decode(path: Path, size: int, channels: int, max_pixels: int) -> np.ndarray | str:
    try:
        return decode_image(path, size, channels, max_pixels)
    except CorruptDataError as error:
        cause = error.__cause__
        reason = str(cause).strip() if cause is not None else ""
        if path.stat().st_size == 0:
            reason = "empty file (0 bytes)"
        return reason or (type(cause).__name__ if cause is not None else "unreadable")


def _allocate(target: Path, size: int) -> None:
    """The cache file with its blocks reserved. A memmap writes through page faults: on a full
    disk (or tmpfs) a write to an unreserved page kills the process with SIGBUS, with no message.
    Reserved first, a full disk is an OSError (ENOSPC) here, which the command reports in one line."""
    import errno

    with open(target, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except AttributeError:  # no posix_fallocate (macOS): a sparse file, as numpy makes it
            f.truncate(size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            f.truncate(size)  # a file system that cannot reserve: a sparse file


def _decode_into(
    found: Scan, cache: Path, size: int, channels: int, key: str, workers: int, progress, max_pixels: int
) -> dict:
    row_bytes = channels * size * size
    target = cache / "images.u8"
    total = len(found.paths)
    _allocate(target, max(total, 1) * row_bytes)
    array = np.memmap(target, dtype=np.uint8, mode="r+", shape=(max(total, 1), channels, size, size))
    kept, labels, skipped, row = [], [], [], 0
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, total, _CHUNK):
            chunk = found.paths[start : start + _CHUNK]
            decodes = pool.map(lambda p: _try_decode(p, size, channels, max_pixels), chunk)
            for offset, decoded in enumerate(decodes):
                path = chunk[offset]
                if isinstance(decoded, str):
                    skipped.append((found.relative(path), decoded))
                    continue
                array[row] = decoded
                kept.append(found.relative(path))
                labels.append(int(found.labels[start + offset]))
                row += 1
            if progress is not None:
                progress(min(start + _CHUNK, total), total)
    array.flush()
    del array
    os.truncate(target, row * row_bytes)  # the rows of the unreadable files were never written
    return {
        "format": _FORMAT,
        "key": key,
        "size": size,
        "channels": channels,
        "paths": kept,
        "labels": labels,
        "skipped": skipped,
    }
