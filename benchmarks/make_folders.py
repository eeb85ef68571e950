"""Folders of "photos" with known kinds, for `clusterlab cluster`: made reproducibly from data on disk.

    python benchmarks/make_folders.py digits-colour  OUT [--count 2000] [--seed 0]
    python benchmarks/make_folders.py fashion-grey   OUT [--count 2000] [--seed 0]
    python benchmarks/make_folders.py fashion-colour OUT [--count 2000] [--seed 0]

Sources: scikit-learn's digits (8x8 grey, 1,797 images; bundled) and Fashion-MNIST (28x28 grey;
`apt-get install dataset-fashion-mnist`). Every image gets the nuisances real photos have, drawn per
image from the seed:

- colour ("-colour" folders): the object and the background each get a random colour (a colour
  cast that differs per image; the object stays the brighter one), so colour says nothing about
  the kind;
- brightness and contrast: x -> a x + b, a in [0.6, 1.3], b in [-40, 40] (of 255);
- noise: Gaussian, sigma in [0, 12] (of 255);
- size: upsampled (bicubic) to a side in [24, 72] px, one side up to 25% longer (non-square);
- format and mode: png / jpg / webp / bmp / tiff, saved as RGB, grey (L), RGBA or palette (P);
- layout: <kind>/<batch>/[more/]<name>.<ext>: nested folders, the kind is the top folder;
- broken files: one truncated JPEG, one zero-byte PNG and one text file named .webp (skipped by
  the command, listed in skipped.csv).

Digits has 1,797 images: for a larger --count, images are drawn again (with other nuisances and a
one-pixel shift), so some digits appear twice, never as the same file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("bmp", "BMP"), ("tiff", "TIFF")]
MODES = ["RGB", "L", "RGBA", "P"]


def source_images(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 N x H x W grey images in [0, 255], labels, kind names (folder-safe)."""
    from clusterlab.data.sources import Digits, FashionMNIST

    source = Digits() if name == "digits" else FashionMNIST()
    data = source.load("train+test")
    names = [c.replace("/", "-").replace(" ", "-").lower() for c in source.classes]
    return data.images[:, 0].numpy(), data.labels.numpy(), names


def pick(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices, the kinds as balanced as the source; repeats only when count > N."""
    order = rng.permutation(len(labels))
    repeats = -(-count // len(labels))
    return np.concatenate([order] + [rng.permutation(len(labels)) for _ in range(repeats - 1)])[:count]


def photo(grey: np.ndarray, colour: bool, shifted: bool, rng: np.random.Generator) -> Image.Image:
    """One grey image with a photo's nuisances (see the module docstring), as a PIL image."""
    x = grey.astype(np.float32) / 255.0  # 1 = object (digits / clothes are bright on black)
    if shifted:
        x = np.roll(x, (rng.integers(-1, 2), rng.integers(-1, 2)), axis=(0, 1))
    if colour:
        # Any hue for each; the object stays the brighter of the two (as in the source), by at
        # least 60 levels of luminance, so that it stays visible.
        luminance = np.array([0.299, 0.587, 0.114])
        foreground, background = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        while (foreground - background) @ luminance < 60:
            foreground, background = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        rgb = x[..., None] * foreground + (1 - x[..., None]) * background
    else:
        rgb = np.repeat((x * 255)[..., None], 3, axis=2)
    rgb = rgb * rng.uniform(0.6, 1.3) + rng.uniform(-40, 40)
    side = int(rng.integers(24, 73))
    width, height = side, side
    if rng.random() < 0.5:  # non-square: the longer side up to 25% longer, padded with the border colour
        if rng.random() < 0.5:
            width = int(side * rng.uniform(1.0, 1.25))
        else:
            height = int(side * rng.uniform(1.0, 1.25))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = np.asarray(image, np.float32)[0, 0]  # the corner colour: the background
    top, left = (height - side) // 2, (width - side) // 2
    canvas[top : top + side, left : left + side] = np.asarray(image, np.float32)
    canvas += rng.normal(0, rng.uniform(0, 12), canvas.shape)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def save(image: Image.Image, path: Path, mode: str, fmt: str) -> None:
    if mode == "L" or (mode == "P" and fmt == "JPEG"):
        image = image.convert("L")
    elif mode == "RGBA" and fmt != "JPEG":
        image = image.convert("RGBA")
    elif mode == "P" and fmt != "JPEG":
        image = image.convert("P", palette=Image.ADAPTIVE, colors=64)
    kwargs = {"quality": 85} if fmt in ("JPEG", "WEBP") else {}
    image.save(path, fmt, **kwargs)


def nested_folder(out: Path, kind: str, rng: np.random.Generator) -> Path:
    """Where the next image of `kind` goes, made: <kind>/batch_<0-2>/, one in five in a `more/` below."""
    folder = out / kind / f"batch_{rng.integers(3)}"
    if rng.random() < 0.2:
        folder = folder / "more"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def make_folder(kind: str, out: Path, count: int = 2000, seed: int = 0) -> dict:
    """Write the folder; returns what was written (also saved as OUT.json beside it)."""
    source, _, style = kind.partition("-")
    if source not in ("digits", "fashion") or style not in ("colour", "grey"):
        raise SystemExit(
            f"unknown folder kind {kind!r}: digits-colour, digits-grey, fashion-colour, fashion-grey"
        )
    images, labels, names = source_images("digits" if source == "digits" else "fashion_mnist")
    rng = np.random.default_rng(seed)
    chosen = pick(labels, count, rng)
    seen: set[int] = set()
    out.mkdir(parents=True, exist_ok=False)
    per_kind = np.zeros(len(names), int)
    for n, i in enumerate(chosen):
        ext, fmt = FORMATS[rng.integers(len(FORMATS))]
        mode = MODES[rng.integers(len(MODES))]
        folder = nested_folder(out, names[labels[i]], rng)
        save(
            photo(images[i], style == "colour", int(i) in seen, rng), folder / f"img_{n:05d}.{ext}", mode, fmt
        )
        seen.add(int(i))
        per_kind[labels[i]] += 1
    broken = out / names[0] / "batch_0"
    jpeg = (out / names[1] / "batch_0").glob("*.jpg")
    source_jpeg = next(iter(sorted(jpeg)), None)
    if source_jpeg is not None:
        data = source_jpeg.read_bytes()
        (broken / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (broken / "empty.png").write_bytes(b"")
    (broken / "notes.webp").write_text("not an image\n")
    summary = {
        "kind": kind,
        "count": int(count),
        "seed": seed,
        "kinds": dict(zip(names, per_kind.tolist())),
        "broken": 3 if source_jpeg is not None else 2,
        "repeats": int(count - len(seen)),
    }
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(
    make=make_folder, kinds: str = "digits-colour, digits-grey, fashion-colour or fashion-grey", doc=__doc__
):
    """The command line of a folder maker: KIND OUT [--count] [--seed], the summary printed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("kind", help=kinds)
    parser.add_argument("out", type=Path, help="the folder to create (must not exist)")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(make(args.kind, args.out, args.count, args.seed), indent=2))


if __name__ == "__main__":
    main()
