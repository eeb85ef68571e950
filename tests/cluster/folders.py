"""Folders of photos for the tests of the folder command: four kinds of pattern, each image in its
own format, mode, size and colour cast, with a few unreadable files among them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

KINDS = ("stripes", "bars", "checks", "rings")  # four kinds no colour cast can hide
FORMATS = (("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("bmp", "BMP"), ("tiff", "TIFF"))
MODES = ("RGB", "L", "RGBA", "P")


def pattern(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """A side x side pattern in [0, 1] with a random phase and period."""
    y, x = np.mgrid[0:side, 0:side] / side
    period, phase = rng.uniform(0.22, 0.3), rng.uniform(0, 1)
    if kind == "stripes":
        wave = np.sin(2 * np.pi * (y / period + phase))
    elif kind == "bars":
        wave = np.sin(2 * np.pi * (x / period + phase))
    elif kind == "checks":
        wave = np.sin(2 * np.pi * (x / period + phase)) * np.sin(2 * np.pi * (y / period + phase))
    else:
        cy, cx = rng.uniform(0.4, 0.6, 2)
        wave = np.sin(2 * np.pi * (np.hypot(x - cx, y - cy) / period + phase))
    return (wave > 0).astype(np.float32)


def write_photo_folder(root: Path, per_kind: int = 30, seed: int = 0) -> dict[str, int]:
    """Kinds in nested folders (<kind>/<batch>/[deeper/]), each image with its own colour cast,
    exposure and noise, size and aspect, file format and mode; plus a truncated JPEG, a zero-byte
    PNG and a text file named .png. Returns {kind: images}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, kind in enumerate(KINDS):
        for i in range(per_kind):
            width, height = int(rng.integers(28, 64)), int(rng.integers(28, 64))
            base = pattern(kind, max(width, height), rng)[:height, :width, None]
            foreground, background = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            image = base * foreground + (1 - base) * background
            image = image * rng.uniform(0.7, 1.2) + rng.normal(0, 8, image.shape)
            ext, fmt = FORMATS[(i + k) % len(FORMATS)]
            mode = MODES[i % len(MODES)]
            folder = root / kind / f"batch_{i % 3}" / ("deeper" if i % 5 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
            if mode == "P" and fmt != "JPEG":
                picture = picture.convert("P", palette=Image.ADAPTIVE, colors=32)
            elif mode == "L":
                picture = picture.convert("L")
            elif mode == "RGBA" and fmt != "JPEG":
                picture = picture.convert("RGBA")
            picture.save(folder / f"{kind}_{i:03d}.{ext}", fmt)
    good = sorted((root / KINDS[0]).rglob("*.jpg"))[0].read_bytes()
    (root / KINDS[0] / "batch_0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / KINDS[1] / "empty.png").write_bytes(b"")
    (root / KINDS[2] / "notes.png").write_text("not an image\n")
    (root / "README.txt").write_text("other files are ignored\n")
    return {kind: per_kind for kind in KINDS}


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_predict_groups_as_the_report(folder: Path, out: Path) -> None:
    """`clusterlab predict` with the config and checkpoint the folder command wrote into `out` (run in
    the current folder) gives every image of `folder` the cluster assignments.csv gave it."""
    from clusterlab.cli import main

    checkpoint = str(out / "checkpoints" / "last.ckpt")
    main(
        ["predict", "--config", str(out / "config.yaml"), "--ckpt_path", checkpoint]
        + ["--data.dataset", "image_folder", "--data.root", str(folder)]
    )
    predicted = rows(next(out.glob("predict-*/assignments.csv")))
    assigned = {r["path"]: int(r["cluster"]) for r in rows(out / "assignments.csv")}
    assert len(predicted) == len(assigned)
    same = sum(assigned[str(Path(r["path"]).relative_to(folder))] == int(r["cluster"]) for r in predicted)
    assert same == len(assigned)  # the checkpoint numbers clusters as the report does
