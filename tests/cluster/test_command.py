"""`clusterlab cluster FOLDER`: a real folder through the real command, its report in a real browser."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterlab.cli import main
from clusterlab.cluster import output

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


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """The command run once on a folder of four kinds (K auto), shared by the tests that read it."""
    root = tmp_path_factory.mktemp("cluster")
    folder, out = root / "photos", root / "grouped"
    write_photo_folder(folder)
    # Epochs, not minutes, end the training here, so that the result does not depend on the load.
    main(
        ["cluster", str(folder), "--out", str(out), "--epochs", "40", "--minutes", "5", "--batch_size", "40"]
    )
    return folder, out


def test_the_folder_is_grouped_into_its_kinds_and_every_output_is_written(grouped, capsys):
    folder, out = grouped
    summary = json.loads((out / "cluster.json").read_text())
    assert summary["k_auto"] and summary["num_clusters"] == len(KINDS)  # chosen without the labels
    assert summary["flip"] and summary["mirror_ratio"] < 1.25  # stripes, bars, checks, rings have no side
    assignments = rows(out / "assignments.csv")
    assert len(assignments) == 4 * 30 and {r["path"].split("/")[0] for r in assignments} == set(KINDS)
    assert all(0 < float(r["confidence"]) <= 1 for r in assignments)
    skipped = {r["path"]: r["reason"] for r in rows(out / "skipped.csv")}
    assert set(skipped) == {"stripes/batch_0/truncated.jpg", "bars/empty.png", "checks/notes.png"}
    assert skipped["bars/empty.png"] == "empty file (0 bytes)"
    sizes = [int(n) for n in summary["cluster_sizes"]]
    assert sizes == sorted(sizes, reverse=True)  # cluster 0 is the largest
    counts = [sum(int(r["cluster"]) == k for r in assignments) for k in range(summary["num_clusters"])]
    assert counts == sizes
    assert summary["metrics"]["acc"] >= 0.9  # four kinds, one per cluster
    for k in range(summary["num_clusters"]):
        assert (out / "clusters" / f"{k}.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    cache = out / "cache" / "images.u8"
    assert cache.stat().st_size == len(assignments) * 3 * 32 * 32  # one uint8 row per readable image
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".grouped")]  # no partial folder left


def test_the_report_opens_offline_in_a_real_browser_with_every_image(grouped):
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is in the dev extra: make setup"
    )
    if not shutil.which("chromium") and not Path("/usr/bin/chromium").exists():
        pytest.skip("chromium is not installed (make setup installs it with apt-get)")
    _, out = grouped
    page_path = out / "report.html"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium") or "/usr/bin/chromium",
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        requests = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth])"
        )
        text = page.inner_text("body")
        browser.close()
    assert requests and all(url.startswith("file://") for url in requests), [
        u for u in requests if "file:" not in u
    ]
    assert len(images) > 4 * 2  # figures and thumbnails
    for src, width in images:
        assert not src.startswith(("/", "http")) and (out / src).is_file(), src
        assert width > 0, f"{src} did not load"
    for k in range(len(KINDS)):
        assert f"cluster {k}" in text
    assert "ACC" in text and "most confident" in text and "least confident" in text


def test_predict_groups_images_as_the_report_does_with_the_written_checkpoint(grouped, tmp_path, monkeypatch):
    folder, out = grouped
    monkeypatch.chdir(tmp_path)
    main(
        [
            "predict",
            "--config",
            str(out / "config.yaml"),
            "--ckpt_path",
            str(out / "checkpoints" / "last.ckpt"),
            "--data.dataset",
            "image_folder",
            "--data.root",
            str(folder),
        ]
    )
    predicted = rows(next(out.glob("predict-*/assignments.csv")))
    assigned = {r["path"]: int(r["cluster"]) for r in rows(out / "assignments.csv")}
    assert len(predicted) == len(assigned)
    same = sum(assigned[str(Path(r["path"]).relative_to(folder))] == int(r["cluster"]) for r in predicted)
    assert same == len(assigned)  # the checkpoint numbers clusters as the report does


def test_a_rerun_into_the_same_out_replaces_the_previous_output_whole(grouped, tmp_path, capsys):
    folder, previous = grouped
    out = tmp_path / "again"
    # (Without the predict-* folders that other tests' `clusterlab predict` wrote into it: a re-run
    # never replaces those, tests/hostile/test_output_folder.py.)
    shutil.copytree(previous, out, ignore=shutil.ignore_patterns("predict-*"))
    # A file that an earlier run wrote (and its marker lists) but this run does not write.
    (out / "leftover.txt").write_text("from an earlier run")
    marker = json.loads((out / output.MARKER).read_text())
    (out / output.MARKER).write_text(json.dumps({**marker, "files": [*marker["files"], "leftover.txt"]}))
    main(
        [
            "cluster",
            str(folder),
            "--out",
            str(out),
            "--num_clusters",
            "3",
            "--epochs",
            "2",
            "--batch_size",
            "40",
        ]
    )
    printed = capsys.readouterr().out
    assert "reused the cache of the previous run" in printed and f"Report: {out / 'report.html'}" in printed
    assert not (out / "leftover.txt").exists()  # nothing of the earlier run is mixed in
    assert json.loads((out / "cluster.json").read_text())["num_clusters"] == 3
    assert {int(r["cluster"]) for r in rows(out / "assignments.csv")} <= {0, 1, 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


@pytest.mark.parametrize("method", ["nnm", "scl", "dccm"])
def test_every_method_groups_a_folder_through_the_command(method, tmp_path, monkeypatch):
    """Two epochs per phase: the other methods' recipes build, train, renumber and load in predict."""
    write_photo_folder(tmp_path / "photos", per_kind=8)
    out = tmp_path / "out"
    main(
        [
            "cluster",
            str(tmp_path / "photos"),
            "--out",
            str(out),
            "--method",
            method,
            "--num_clusters",
            "3",
            "--epochs",
            "2",
            "--batch_size",
            "16",
        ]
    )
    summary = json.loads((out / "cluster.json").read_text())
    assert summary["method"] == method.upper() and summary["num_clusters"] == 3
    assert len(rows(out / "assignments.csv")) == 32 and (out / "report.html").is_file()
    monkeypatch.chdir(tmp_path)
    main(
        [
            "predict",
            "--config",
            str(out / "config.yaml"),
            "--ckpt_path",
            str(out / "checkpoints" / "last.ckpt"),
            "--data.dataset",
            "image_folder",
            "--data.root",
            str(tmp_path / "photos"),
        ]
    )
    predicted = {
        str(Path(r["path"]).relative_to(tmp_path / "photos")): int(r["cluster"])
        for r in rows(next(out.glob("predict-*/assignments.csv")))
    }
    assert predicted == {r["path"]: int(r["cluster"]) for r in rows(out / "assignments.csv")}


def one_line_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["cluster", *map(str, argv)])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line_with_what_where_and_what_to_do_and_leaves_nothing(tmp_path, capsys):
    photos = tmp_path / "photos"
    write_photo_folder(photos, per_kind=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"")
    (tmp_path / "broken" / "b.jpg").write_text("no")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    out = tmp_path / "out"
    cases = [
        ((tmp_path / "missing", "--out", out), "does not exist"),
        ((tmp_path / "empty", "--out", out), "no images under"),
        ((tmp_path / "broken", "--out", out), "none of the 2 image files"),
        ((photos, "--out", tmp_path / "a_file" / "out"), "cannot write --out"),
        ((photos, "--out", out, "--num_clusters", "1"), "at least 2 clusters"),
        ((photos, "--out", out, "--num_clusters", "99"), "more clusters than the 8 readable images"),
        ((photos, "--out", out, "--num_clusters", "many"), "a whole number of clusters, or auto"),
        ((photos, "--out", out, "--minutes", "0"), "more than 0 minutes"),
        ((photos, "--out", out, "--minutes", "-2"), "more than 0 minutes"),
        ((photos, "--out", photos / "out"), "inside the image folder"),
        ((photos, "--out", tmp_path / "mine"), "did not write; nothing was changed"),
        (
            (photos, "--out", out, "--method", "kmeans"),
            "neither one of cc, nnm, scl, dccm nor the class path",
        ),
        (
            (photos, "--out", out, "--method", "clusterlab.methods.base.ClusteringMethod"),
            "declares no folder_recipe",
        ),
    ]
    for argv, expected in cases:
        line = one_line_error(capsys, *argv)
        assert line.startswith("clusterlab: error: ") and expected in line, (argv, line)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert "the following arguments are required: --out" in one_line_error(capsys, photos)


def test_a_run_stopped_by_sigterm_leaves_no_partial_output(tmp_path):
    """`kill` (or a scheduler's time limit) in the middle of training: exit 143, the hidden
    partial folder removed, --out not created."""
    import signal
    import subprocess
    import sys
    import time

    photos, out = tmp_path / "photos", tmp_path / "out"
    write_photo_folder(photos, per_kind=10)
    command = [sys.executable, "-m", "clusterlab", "cluster", str(photos), "--out", str(out)]
    process = subprocess.Popen(
        [*command, "--epochs", "300", "--batch_size", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".out.partial-*/logs")):
            time.sleep(0.2)  # training has started once the phase writes its logs
        assert list(tmp_path.glob(".out.partial-*/logs")), "the run never reached training"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name], list(tmp_path.iterdir())


def test_partial_folders_of_killed_runs_are_removed_by_the_next_run_and_live_ones_kept(tmp_path):
    """SIGKILL leaves the hidden partial folder; the next run into the same --out removes it,
    never the partial folder of a run still going, and the finished output has no owner file."""
    import socket
    import subprocess
    import sys

    from clusterlab.cluster.output import OWNER, make_staging, swap_in

    out = tmp_path / "out"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    killed, running, foreign = (tmp_path / f".out.partial-{n}" for n in ("killed", "running", "foreign"))
    for partial, owner in ((killed, f"{host} {dead.stdout.strip()}"), (running, f"{host} {os.getpid()}")):
        partial.mkdir()
        (partial / OWNER).write_text(owner)
        (partial / "assignments.csv").write_text("path,cluster,confidence\n")
    foreign.mkdir()  # no owner file: not judged
    staging = make_staging(out)
    assert not killed.exists() and running.exists() and foreign.exists()
    assert (staging / OWNER).read_text().split() == [host, str(os.getpid())]
    swap_in(staging, out)
    assert out.is_dir() and not (out / OWNER).exists()


# -- the parts --------------------------------------------------------------------------------


def test_the_decode_cache_is_a_memmap_that_batches_are_read_from(tmp_path):
    from clusterlab.cluster import cache
    from clusterlab.cluster.data import CachedFolderData

    write_photo_folder(tmp_path / "photos", per_kind=3)
    found = cache.scan(tmp_path / "photos")
    decoded = cache.decode(found, tmp_path / "cache", 16)
    images = decoded.images
    assert images.images.shape == (12, 3, 16, 16) and len(decoded.skipped) == 3
    # The tensor is a view of the memory-mapped file: nothing was read into memory to build it.
    assert isinstance(decoded.memmap, np.memmap) and images.images.data_ptr() == decoded.memmap.ctypes.data
    on_disk = np.fromfile(tmp_path / "cache" / "images.u8", dtype=np.uint8).reshape(12, 3, 16, 16)
    assert torch.equal(images.images, torch.from_numpy(on_disk))
    data = CachedFolderData.of(images, found.root, 16, 2, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert torch.equal(batch["image"], images.images[batch["index"]])
    again = cache.decode(found, tmp_path / "cache2", 16, reuse=tmp_path / "cache")
    assert again.reused and torch.equal(again.images.images, images.images)
    (found.paths[0]).write_bytes(found.paths[0].read_bytes())  # touched: another modification time
    assert not cache.decode(found, tmp_path / "cache3", 16, reuse=tmp_path / "cache").reused


def _resident_megabytes() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    return {
        line.split(":")[0]: int(line.split()[1]) / 1024
        for line in status.splitlines()
        if line.startswith(("RssAnon", "RssFile"))
    }


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_a_large_cache_is_never_read_into_memory_whole(tmp_path):
    """50,000 images at 32 px (154 MB): making the data module, its setup and a batch keep them on
    disk. (Lightning deep-copies constructor arguments into the hyper-parameters: the images as
    an argument were read whole into anonymous memory, and kept.)"""
    from clusterlab.cluster.data import CachedFolderData
    from clusterlab.data.sources import ImageSet

    count = 50_000
    array = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="w+", shape=(count, 3, 32, 32))
    images = ImageSet(torch.from_numpy(array), torch.zeros(count, dtype=torch.long), [], [])
    before = _resident_megabytes()
    data = CachedFolderData.of(images, tmp_path, 32, 10, batch_size=256)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    after = _resident_megabytes()
    assert batch["image"].shape == (256, 3, 32, 32)
    assert data.split("train").images.data_ptr() == array.ctypes.data  # the memmap itself
    assert "images" not in data.hparams and "images" not in data.hparams_initial  # nor in hparams.yaml
    assert after["RssAnon"] - before["RssAnon"] < 40, (before, after)  # not the 154 MB


def test_k_is_the_number_of_separated_groups_in_the_features():
    from clusterlab.cluster.choose_k import choose

    generator = torch.Generator().manual_seed(0)
    for groups in (3, 7, 12):
        centres = torch.nn.functional.normalize(torch.randn(groups, 32, generator=generator), dim=1)
        points = centres.repeat_interleave(60, 0) + 0.15 * torch.randn(groups * 60, 32, generator=generator)
        choice = choose(torch.nn.functional.normalize(points, dim=1), range(2, 21))
        assert choice.k == groups and choice.curve["chosen"] == groups and len(choice.curve["value"]) == 19


def test_k_counts_kinds_not_their_sub_kinds():
    """Each kind made of two nearby sub-kinds (sleeve lengths, shoe types): K is the number of
    kinds. (The eigengap, used before, gave 7 for the 10 kinds here.)"""
    from clusterlab.cluster.choose_k import choose

    generator = torch.Generator().manual_seed(0)
    for kinds in (4, 8, 10):
        centres = torch.nn.functional.normalize(torch.randn(kinds, 32, generator=generator), dim=1)
        offsets = torch.nn.functional.normalize(torch.randn(kinds * 2, 32, generator=generator), dim=1)
        sub_kinds = centres.repeat_interleave(2, 0) + 0.25 * offsets
        points = sub_kinds.repeat_interleave(60, 0) + 0.1 * torch.randn(kinds * 120, 32, generator=generator)
        assert choose(torch.nn.functional.normalize(points, dim=1), range(2, 21)).k == kinds


def test_standardised_views_do_not_see_a_colour_cast_or_exposure():
    from clusterlab.data.views import SimCLRViews

    views = SimCLRViews(size=16, standardize=True)
    images = torch.rand(4, 3, 16, 16)
    cast = images * torch.tensor([0.5, 0.9, 0.7]).view(1, 3, 1, 1) + torch.tensor([0.3, 0.0, 0.1]).view(
        1, 3, 1, 1
    )
    scale = images.std((-2, -1), keepdim=True)
    expected = views.plain(images)
    assert torch.allclose(views.plain(cast), expected, atol=0.05 * math.sqrt(3) / float(scale.min()))
    assert views.plain(cast).mean((-2, -1)).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["cc", "nnm", "scl", "dccm", "clusterlab.methods.SimCLR"])
def test_renumbered_clusters_are_the_same_clusters_under_new_numbers(method):
    from clusterlab.cluster import recipe

    model, _ = recipe.build(recipe.clustering(method, 16, 5, 100, 10, pretext_checkpoint="unused.ckpt"))
    model.eval()
    if model.cluster_head.fitted:  # k-means centres as a fit would leave them
        model.cluster_head.centroids.copy_(torch.randn_like(model.cluster_head.centroids))
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    before = model.predict_proba(images)[model.selected_head]
    memory = copy.deepcopy(model.semantic_memory["clustering"]) if hasattr(model, "semantic_memory") else None
    order = [3, 0, 4, 1, 2]
    model.permute_clusters_(order)
    after = model.predict_proba(images)[model.selected_head]
    assert torch.allclose(after, before[:, order], atol=1e-6)
    if memory is not None:  # SCL: the target task's memory holds one queue per cluster, renumbered too
        for name in ("keys", "index", "pointer"):
            assert torch.equal(
                getattr(model.semantic_memory["clustering"], name), getattr(memory, name)[order]
            )
    with pytest.raises(ValueError, match="not a permutation"):
        model.permute_clusters_([0, 0, 1, 2, 3])


def test_the_mirror_ratio_tells_digits_which_have_a_side_from_kinds_that_do_not():
    """Digits mirrored are not digits (a 2 mirrored is nearly a 5): about 3x as far from the other
    digits as a digit is. The same digits with half of them mirrored at random have no side: a
    mirror image is one more draw of the folder, the ratio is 1 up to sampling noise."""
    from sklearn.datasets import load_digits

    from clusterlab.cluster import recipe

    digits = torch.from_numpy(load_digits().images).float()[:, None] / 16.0
    images = (torch.nn.functional.interpolate(digits, size=32, mode="bilinear") * 255).to(torch.uint8)
    images = images.expand(-1, 3, -1, -1)
    assert recipe.mirror_ratio(images) > 2.0 * recipe.MIRROR_RATIO_LIMIT
    mirrored = torch.rand(len(images), generator=torch.Generator().manual_seed(0)) < 0.5
    no_side = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
    assert abs(recipe.mirror_ratio(no_side) - 1.0) < 0.1
    assert abs(recipe.mirror_ratio(no_side, max_images=500) - 1.0) < 0.15  # a sample of a large folder


@pytest.mark.parametrize("method", ["cc", "nnm", "scl", "dccm"])
def test_every_method_s_views_flip_only_when_the_recipe_says_so(method):
    from kornia.augmentation import RandomHorizontalFlip

    from clusterlab.cluster import recipe

    for flip in (True, False):
        model, resolved = recipe.build(recipe.clustering(method, 16, 5, 100, 10, "unused.ckpt", flip=flip))
        flips = [m for m in model.views.modules() if isinstance(m, RandomHorizontalFlip)]
        assert bool(flips) == flip and resolved["init_args"]["views"]["init_args"]["flip"] == flip
    model, _ = recipe.build(recipe.pretext(16, 5, flip=False))
    assert not [m for m in model.views.modules() if isinstance(m, RandomHorizontalFlip)]


def test_the_recipe_config_is_the_model_trained():
    from clusterlab.cluster import recipe

    model, resolved = recipe.build(recipe.clustering("cc", 32, 7, 2000, 100))
    again, _ = recipe.build(resolved)
    assert type(again) is type(model) and again.num_clusters == 7
    assert [tuple(p.shape) for p in again.parameters()] == [tuple(p.shape) for p in model.parameters()]
    assert resolved["init_args"]["views"]["init_args"]["standardize"] is True


@pytest.mark.slow
@pytest.mark.timeout(20 * 60)  # the command's 15 minutes and the folder's making, not the suite's 10
def test_two_thousand_colour_cast_digits_are_grouped_into_about_ten_clusters_within_15_minutes(tmp_path):
    """The issue's target on a 2-core CPU: ten kinds -> K in 8..12, ACC >= 0.85, under 15 minutes."""
    import importlib.util
    import time

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("make_folders", Path(REPO, "benchmarks", "make_folders.py"))
    make_folders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_folders)
    make_folders.make_folder("digits-colour", tmp_path / "digits", count=2000, seed=1)
    started = time.time()
    main(["cluster", str(tmp_path / "digits"), "--out", str(tmp_path / "out")])
    assert time.time() - started < 15 * 60
    summary = json.loads((tmp_path / "out" / "cluster.json").read_text())
    assert 8 <= summary["num_clusters"] <= 12 and summary["metrics"]["acc"] >= 0.85
