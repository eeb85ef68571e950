"""Hostile folders: what a folder of images can hold must not crash a run, fill the memory, hide
images, or plant formulas in the CSV files a user opens in a spreadsheet.

- a decompression bomb (a small PNG that decodes to 400 megapixels) is skipped with its size,
  read from its header; the run goes on (`clusterlab cluster`, `clusterlab predict`, image_folder);
- a folder of copies of one picture, or of fewer different pictures than K, is one line, not
  `argmax of an empty sequence` or a segmentation fault in the report's t-SNE;
- a full disk while writing --out is one line that names --out and says the previous output is kept;
- a file named `=1+1.png` is written `'=1+1.png` in every CSV (clusterlab.csvsafe);
- images beside `train/` and `test/` folders are grouped by `clusterlab cluster`, and named in one
  line by `--data.dataset image_folder`, whose splits do not read them.

Runs of the command are launched as processes with a timeout (tests.launch), so that a crash or a
hang fails the test instead of the suite; error lines are checked through `clusterlab.cli.main`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterlab.cli import main
from tests.launch import clusterlab, run

FAST = ["--epochs", "1", "--minutes", "0.5", "--image_size", "8", "--batch_size", "8"]
TIMEOUT = 180  # seconds per launched run: about 8 s each on a 2-core CPU
BOMB = "20000 x 20000 = 400,000,000 pixels, over --max_pixels 120,000,000"  # the reason skipped.csv gives


def pictures(folder: Path, names: list[str], seed: int = 0, side: int = 12) -> None:
    """One different picture (random colours) per name, as PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / name, "PNG")


def png_bomb(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A valid greyscale PNG of width x height black pixels, written by hand a row at a time (never
    held decoded): 380 KB on disk for 400 megapixels, 1.6 GB once PIL decodes it to RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # the filter byte (0: none), then the row
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one_line_error(capsys, *argv) -> str:
    """`clusterlab cluster ARGV` in this process: exit code 1 and one line on stderr, returned."""
    with pytest.raises(SystemExit) as done:
        main(["cluster", *map(str, argv)])
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def no_partial_output(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# -- 1. decompression bombs, 4. formulas in CSV cells --------------------------------------------

NAMES = [f"img_{i}.png" for i in range(8)] + ["=1+1.png", "@SUM(A1).png"]


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A folder named `@photos` of 10 pictures (two named as formulas), a bomb and an unreadable
    `=broken.png`, grouped once by the command."""
    root = tmp_path_factory.mktemp("hostile")
    folder, out = root / "@photos", root / "out"
    pictures(folder, NAMES)
    png_bomb(folder / "bomb.png")
    (folder / "=broken.png").write_text("not an image\n")
    done = clusterlab("cluster", str(folder), "--out", str(out), "--num_clusters", "2", *FAST, cwd=root)
    assert done.returncode == 0, done.tail()
    return root, folder, out, done


def test_a_decompression_bomb_is_skipped_with_its_size_and_the_run_goes_on(grouped):
    _, _, out, done = grouped
    assert "Traceback" not in done.stderr and "DecompressionBomb" not in done.stderr, done.tail()
    skipped = {r["path"]: r["reason"] for r in rows(out / "skipped.csv")}
    assert skipped["bomb.png"] == BOMB
    assert set(skipped) == {"bomb.png", "'=broken.png"}
    assert len(rows(out / "assignments.csv")) == 10  # every other picture is grouped
    summary = json.loads((out / "cluster.json").read_text())
    assert summary["images"] == 10 and summary["skipped"] == 2
    assert "max_pixels: 120000000" in (out / "config.yaml").read_text()  # predict applies the same limit


def test_the_bomb_is_refused_from_its_header_before_a_pixel_is_decoded(tmp_path):
    import resource

    from clusterlab.data.sources import CorruptDataError, ImageTooLargeError, decode_image

    png_bomb(tmp_path / "bomb.png")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    started = time.time()
    with pytest.raises(CorruptDataError) as refused:
        decode_image(tmp_path / "bomb.png", 8, 3)
    assert isinstance(refused.value.__cause__, ImageTooLargeError) and str(refused.value.__cause__) == BOMB
    assert time.time() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # not the 1.6 GB decode
    png_bomb(tmp_path / "small.png", 300, 200)  # the limit is per call, at the pixel
    assert decode_image(tmp_path / "small.png", 8, 3, max_pixels=60_000).shape == (3, 8, 8)
    with pytest.raises(CorruptDataError) as refused:
        decode_image(tmp_path / "small.png", 8, 3, max_pixels=59_999)
    assert str(refused.value.__cause__) == "300 x 200 = 60,000 pixels, over --max_pixels 59,999"


def test_a_max_pixels_that_would_skip_every_image_is_one_line(tmp_path, capsys):
    line = one_line_error(capsys, tmp_path, "--out", tmp_path / "out", *FAST, "--max_pixels", "10")
    assert line == (
        "clusterlab: error: --max_pixels 10: every image would be skipped; give at least 64 (--image_size "
        "squared), or leave the default 120,000,000"
    )


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_counted_so(tmp_path):
    """A 4000 x 3000 photo decodes at 1/8 (500 x 375) for an 8-px working size: under a limit of
    1,000,000 pixels, which the same picture as a PNG is over."""
    from PIL import Image

    from clusterlab.data.sources import CorruptDataError, decode_image

    photo = Image.new("RGB", (4000, 3000), (200, 30, 40))
    photo.save(tmp_path / "photo.jpg", "JPEG")
    photo.save(tmp_path / "photo.png", "PNG")
    decoded = decode_image(tmp_path / "photo.jpg", 8, 3, max_pixels=1_000_000)
    assert decoded.shape == (3, 8, 8) and abs(int(decoded[0].mean()) - 200) <= 3
    with pytest.raises(CorruptDataError) as refused:
        decode_image(tmp_path / "photo.png", 8, 3, max_pixels=1_000_000)
    assert str(refused.value.__cause__) == "4000 x 3000 = 12,000,000 pixels, over --max_pixels 1,000,000"
    with pytest.raises(CorruptDataError) as refused:
        decode_image(tmp_path / "photo.jpg", 8, 3, max_pixels=100_000)
    assert str(refused.value.__cause__) == (
        "4000 x 3000 = 12,000,000 pixels (decoded at 500 x 375 = 187,500), over --max_pixels 100,000"
    )


def test_decodes_running_at_once_hold_at_most_the_budget_whatever_the_threads():
    """Eight threads, each decode taking 60 of a budget of 100: one at a time; one larger than the
    whole budget runs alone rather than never."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from clusterlab.data.sources import _DecodeMemory

    budget, held, most = _DecodeMemory(100), [0], [0]
    lock = threading.Lock()

    def decode(amount: int) -> None:
        with budget.hold(amount):
            with lock:
                held[0] += min(amount, 100)
                most[0] = max(most[0], held[0])
            time.sleep(0.01)
            with lock:
                held[0] -= min(amount, 100)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(decode, [60] * 16 + [500] + [30] * 8))
    assert most[0] <= 100 and budget.used == 0


def test_an_image_folder_run_refuses_a_bomb_in_one_line_or_skips_it(tmp_path):
    """`--data.dataset image_folder`: fit stops with one line naming the bomb and its size (the CLI
    prints UserError messages as they are); predict's on_error=skip leaves it out with its reason."""
    from clusterlab.data.sources import ImageFolder, UnreadableImagesError

    pictures(tmp_path, ["a.png", "b.png"])
    png_bomb(tmp_path / "bomb.png")
    with pytest.raises(UnreadableImagesError) as refused:
        ImageFolder(tmp_path, image_size=8).load("train")
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert (
        f"1 of the 3 images under {tmp_path} cannot be read: first {tmp_path / 'bomb.png'}: {BOMB}."
        in message
    )
    assert "pass --data.on_error skip" in message
    source = ImageFolder(tmp_path, image_size=8, on_error="skip")
    with pytest.warns(UserWarning, match="bomb.png"):
        assert len(source.load("train")) == 2
    assert source.skipped == [(str(tmp_path / "bomb.png"), BOMB)]


def test_predict_skips_the_bomb_and_writes_formula_paths_inert(grouped):
    """`clusterlab predict` on `@photos` given relative (so every path cell starts with `@`): the
    bomb in skipped.csv with its size, and every path cell quoted in both CSV files."""
    root, folder, out, _ = grouped
    done = clusterlab(
        "predict",
        "--config",
        str(out / "config.yaml"),
        "--ckpt_path",
        str(out / "checkpoints" / "last.ckpt"),
        "--data.dataset",
        "image_folder",
        "--data.root",
        "@photos",
        cwd=root,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.tail()
    run_dir = next(out.glob("predict-*"))
    assigned = [r["path"] for r in rows(run_dir / "assignments.csv")]
    assert sorted(assigned) == sorted(f"'@photos/{name}" for name in NAMES)
    skipped = {r["path"]: r["reason"] for r in rows(run_dir / "skipped.csv")}
    assert skipped["'@photos/bomb.png"] == BOMB and "'@photos/=broken.png" in skipped


def test_csv_cells_a_spreadsheet_would_run_are_written_inert(grouped):
    _, _, out, _ = grouped
    text = (out / "assignments.csv").read_text()
    assert re.search(r"^'=1\+1\.png,\d,0\.\d{4}$", text, re.MULTILINE), text
    assert re.search(r"^'@SUM\(A1\)\.png,\d,", text, re.MULTILINE), text
    paths = {r["path"] for r in rows(out / "assignments.csv")}
    assert "'=1+1.png" in paths and "'@SUM(A1).png" in paths and "img_0.png" in paths  # read back: quoted
    assert not [p for p in paths if p.startswith(("=", "+", "-", "@", "\t", "\r"))]
    assert (out / "skipped.csv").read_text().count("\n'=broken.png,") == 1


def test_the_csv_helper_quotes_exactly_the_cells_that_start_a_formula():
    from clusterlab import csvsafe

    for value in ("=1+1", "+1", "-1+2", "@SUM(A1)", "\tx", "\rx"):
        assert csvsafe.cell(value) == "'" + value and csvsafe.unquote(csvsafe.cell(value)) == value
    for value in ("a=1", "photo.png", "", "'quoted", "/abs/=x.png"):
        assert csvsafe.cell(value) == value and csvsafe.unquote(value) == value
    assert csvsafe.cell("'=1") == "''=1" and csvsafe.unquote("''=1") == "'=1"  # read back exactly
    assert csvsafe.row(["=x", 3, -0.5, "y"]) == ["'=x", 3, -0.5, "y"]  # numbers are not text


# -- 2. degenerate folders -----------------------------------------------------------------------


def copies(folder: Path, pictures_count: int, each: int) -> None:
    """`pictures_count` different pictures, `each` byte-identical copies of every one."""
    pictures(folder, [f"p{p}_0.png" for p in range(pictures_count)], seed=3)
    for p in range(pictures_count):
        for c in range(1, each):
            (folder / f"p{p}_{c}.png").write_bytes((folder / f"p{p}_0.png").read_bytes())


@pytest.mark.parametrize("k", ["auto", "3"])
def test_a_folder_of_copies_of_one_picture_is_one_line_not_a_crash(k, tmp_path, capsys):
    """Decided: copies of one picture have nothing to group, whatever K; a run would train for
    nothing and give one cluster of everything. (Before: `argmax of an empty sequence` with auto,
    a segmentation fault in the report's t-SNE with K = 3.)"""
    folder, out = tmp_path / "same", tmp_path / "out"
    copies(folder, 1, 12)
    line = one_line_error(capsys, folder, "--out", out, "--num_clusters", k, *FAST)
    assert line == (
        f"clusterlab: error: the 12 readable images under {folder} are all the same picture (identical "
        "once decoded to 8 px): there is nothing to group. Add images that differ."
    )
    assert not out.exists() and no_partial_output(tmp_path)


def test_fewer_different_pictures_than_k_is_one_line(tmp_path, capsys):
    folder, out = tmp_path / "three", tmp_path / "out"
    copies(folder, 3, 4)
    line = one_line_error(capsys, folder, "--out", out, "--num_clusters", "5", *FAST)
    assert line == (
        f"clusterlab: error: --num_clusters 5: the 12 readable images under {folder} are only 3 different "
        "pictures (the others are copies of them, at 8 px); give at most 3 clusters, or auto"
    )
    assert not out.exists() and no_partial_output(tmp_path)


def test_k_auto_chooses_at_most_the_number_of_different_pictures(tmp_path):
    folder, out = tmp_path / "three", tmp_path / "out"
    copies(folder, 3, 4)
    done = clusterlab("cluster", str(folder), "--out", str(out), *FAST, cwd=tmp_path, timeout=TIMEOUT)
    assert done.returncode == 0, done.tail()
    summary = json.loads((out / "cluster.json").read_text())
    assert summary["k_auto"] and summary["num_clusters"] in (2, 3)
    assert len(rows(out / "assignments.csv")) == 12


def test_choose_k_on_identical_features_says_there_is_nothing_to_group():
    from clusterlab.cluster.choose_k import choose
    from clusterlab.errors import ConfigError

    with pytest.raises(ConfigError, match="the features of the 40 images do not tell them apart"):
        choose(torch.ones(40, 16), range(2, 11))


def test_t_sne_of_identical_features_is_refused_not_a_segmentation_fault(tmp_path):
    """40 identical rows made scikit-learn's Barnes-Hut t-SNE segfault (its PCA start divides by
    0): run in a process of its own, so that a regression fails this test, not the suite."""
    code = (
        "import torch, pathlib\n"
        "from clusterlab.callbacks.figures import embedding_figure\n"
        "outputs = {'features': torch.ones(40, 16), 'cluster': torch.zeros(40, dtype=torch.long)}\n"
        "try:\n"
        "    embedding_figure(outputs, 2000, 't', pathlib.Path('e.png'))\n"
        "except ValueError as error:\n"
        "    print('refused:', error)\n"
    )
    done = run([sys.executable, "-c", code], cwd=tmp_path, timeout=TIMEOUT)
    assert done.returncode == 0, done.tail()
    assert (
        done.stdout.strip()
        == "refused: the features of all 40 samples are the same: there is no layout to draw"
    )


def test_a_figure_that_cannot_be_drawn_is_named_in_the_report_in_its_place(tmp_path):
    from clusterlab.cluster import report

    outputs = {
        "features": torch.ones(12, 16),
        "cluster": torch.tensor([0] * 6 + [1] * 6),
        "confidence": torch.full((12,), 0.9),
        "label": torch.full((12,), -1),
        "num_clusters": 2,
    }
    missing: dict[str, str] = {}
    with pytest.warns(UserWarning, match="figure embedding.png not drawn"):
        figures = report.draw_figures(outputs, [], None, tmp_path / "figures", missing=missing)
    assert "sizes" in figures and "embedding" not in figures
    assert missing == {
        "embedding": "ValueError: the features of all 12 samples are the same: there is no layout to draw"
    }
    summary = {
        "folder": "/photos",
        "images": 12,
        "num_clusters": 2,
        "k_auto": False,
        "k_method": "given",
        "skipped": 0,
        "method": "CC",
        "epochs": 1,
        "train_minutes": 0.1,
        "total_minutes": 0.2,
        "predict_command": "clusterlab predict ...",
        "figures_not_drawn": missing,  # as the command records it in cluster.json
    }
    page = report.write_html(tmp_path / "report.html", summary, [], figures, None).read_text()
    assert (
        "The t-SNE of the features could not be drawn: ValueError: the features of all 12 samples are the "
        "same: there is no layout to draw" in page
    )


# -- 3. a full disk ------------------------------------------------------------------------------

FULL = re.compile(
    r"clusterlab: error: cannot write the output for --out (?P<out>\S+): (?P<why>[^,(]+)(?: \(\S+\))?, while "
    r"building it in (?P<staging>\S+)\. Nothing was replaced: the previous output in (?P=out) is kept as it "
    r"was, and the partial output is removed\. .+, and run again\."
)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_a_file_size_limit_met_while_writing_keeps_the_previous_output(tmp_path):
    """`ulimit -f 16` (16 KB a file: the checkpoint alone is larger) makes the writes fail with
    EFBIG, as a full disk fails them with ENOSPC: one line, the previous output as it was."""
    folder, out = tmp_path / "photos", tmp_path / "out"
    pictures(folder, [f"img_{i}.png" for i in range(8)])
    argv = ["cluster", str(folder), "--out", str(out), "--num_clusters", "2", *FAST]
    first = clusterlab(*argv, cwd=tmp_path, timeout=TIMEOUT)
    assert first.returncode == 0, first.tail()
    before = snapshot(out)
    code = (
        "import resource, runpy, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))\n"
        f"sys.argv = ['clusterlab', *{argv!r}]\n"
        "runpy.run_module('clusterlab', run_name='__main__')\n"
    )
    done = run([sys.executable, "-c", code], cwd=tmp_path, timeout=TIMEOUT)
    assert done.returncode == 1, done.tail()
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, done.tail()
    match = FULL.fullmatch(line)
    assert match and match["out"] == str(out) and match["why"] == "File too large", line
    assert "Raise the limit on the size of a file (ulimit -f)" in line
    assert snapshot(out) == before and no_partial_output(tmp_path)


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    return made.returncode == 0


@pytest.mark.slow  # 14 s; the ulimit test above fails the same writes (EFBIG) every make test
def test_a_full_disk_while_writing_keeps_the_previous_output(tmp_path):
    """A real ENOSPC: a 4 MB tmpfs (root only; skipped where mounting is not allowed), filled to
    its last 64 KB after a first run."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("mounting a tmpfs needs root and the right to mount (the ulimit test covers the rest)")
    try:
        folder, out = tmp_path / "photos", disk / "out"
        pictures(folder, [f"img_{i}.png" for i in range(8)])
        argv = ["cluster", str(folder), "--out", str(out), "--num_clusters", "2", *FAST]
        first = clusterlab(*argv, cwd=tmp_path, timeout=TIMEOUT)
        assert first.returncode == 0, first.tail()
        before = snapshot(out)
        space = os.statvfs(disk)
        (disk / "filler").write_bytes(bytes(max(0, space.f_bavail * space.f_frsize - 64 * 1024)))
        done = clusterlab(*argv, cwd=tmp_path, timeout=TIMEOUT)
        assert done.returncode == 1, done.tail()
        line = done.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line, done.tail()
        match = FULL.fullmatch(line)
        assert match and match["out"] == str(out) and match["why"] == "No space left on device", line
        assert snapshot(out) == before and no_partial_output(disk)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# -- 5. images beside split folders --------------------------------------------------------------

LAYOUT = ["train/a/0.png", "train/a/1.png", "train/b/0.png", "train/b/1.png", "test/a/0.png", "test/b/0.png"]
BESIDE = ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png", "dog/2.png"]


def test_cluster_groups_the_images_beside_train_and_test_folders_too(tmp_path):
    """Grouping a folder is not split by split: all 12 images, the 6 in cat/ and dog/ included."""
    folder, out = tmp_path / "photos", tmp_path / "out"
    pictures(folder, LAYOUT + BESIDE)
    done = clusterlab(
        "cluster", str(folder), "--out", str(out), "--num_clusters", "2", *FAST, cwd=tmp_path, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.tail()
    assert sorted(r["path"] for r in rows(out / "assignments.csv")) == sorted(LAYOUT + BESIDE)
    assert "12 image files" in done.stdout and "in no split" not in done.stdout


def test_image_folder_names_in_one_line_the_folders_its_splits_do_not_read(tmp_path, capsys):
    """`--data.dataset image_folder` reads train/ and test/ as the splits: cat/ and dog/ beside
    them are named once on stdout, with their counts, not dropped silently."""
    from clusterlab.data.datamodule import ClusterDataModule

    pictures(tmp_path, LAYOUT + BESIDE)
    data = ClusterDataModule("image_folder", root=str(tmp_path), image_size=8, num_clusters=2)
    data.setup("fit")
    assert len(data.train_set) == 6
    printed = capsys.readouterr().out
    assert printed == (
        f"image_folder: {tmp_path}: train/ and test/ read as the splits; cat/ (3 images), dog/ (3 images) "
        "beside them are in no split and are skipped (move them into a split folder to use them)\n"
    )
    data.source.load("train")  # once per source, not once per listing
    assert capsys.readouterr().out == ""
