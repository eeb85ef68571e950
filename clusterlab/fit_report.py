"""The report of a fit, validate or test: metrics.json in the run directory, and a table on the terminal.

metrics.json holds the final ACC / NMI / ARI of every head and of the selected one, the cluster
sizes, the epochs, seed and wall time, the command and the machine (`environment`), and k-means
on the pixels of the same images (`kmeans_baseline`) where the images have labels. `print_report`
shows the same figures as a table, ending with the run directory.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from clusterlab.env import PACKAGES, faiss_wheels, installed_version

# Every labelling's figures, in the order the report prints them (clusterlab.metrics.ClusteringMetrics)
METRICS = ("acc", "nmi", "ari", "ami", "many_to_one_acc")


def known_classes(labels) -> int | None:
    """The number of classes among the known labels (-1: unknown); None when no label is known."""
    known = labels[labels >= 0]
    return int(known.unique().numel()) if known.numel() else None


@rank_zero_only
def write_report(
    stage: str,
    wall_time: float,
    *,
    config,
    model,
    data,
    trainer,
    run_dir: Path,
    checkpoint_meta: dict | None,
) -> None:
    """metrics.json and the printed table. Rank 0 only: everything it reads was gathered
    before (model.eval_results), and it calls no collective."""
    meta = checkpoint_meta or {}
    results = model.eval_results
    report = {
        "stage": stage,
        "method": type(model).__name__,
        "dataset": data.hparams.dataset,
        "train_split": data.hparams.train_split,
        "eval_split": data.eval_split,
        "num_samples": len(data.eval_set),
        "num_clusters": model.num_clusters,
        "num_classes": known_classes(data.eval_set.labels),  # beside K: over-clustering is K > classes
        "seed": config.seed_everything,
        "epochs": int(model.epochs_trained) if stage == "fit" else meta.get("epochs_trained"),
        "steps": trainer.global_step if stage == "fit" else meta.get("global_step"),
        "wall_time_s": round(wall_time, 1),
        "devices": trainer.world_size,
        **{k: results.get(k) for k in (*METRICS, "selected_head", "heads")},
        # combine_heads "vote": the figures above are the heads' vote, not the selected head's.
        **({"vote": True} if results.get("vote") else {}),
        # What selected the head: each head's unsupervised loss over the last training epoch.
        "head_losses": [None if math.isnan(v) else round(v, 6) for v in model.head_loss.tolist()],
        # restarts > 1: each restart's criterion (mean over its last epochs) and the one kept.
        **(restart_report(model) if model.restarts > 1 else {}),
        "cluster_sizes": results.get("cluster_sizes"),
        "collapsed": results.get("collapsed"),
        **({"diagnostics": model.diagnostics} if model.diagnostics else {}),
        "config": "config.yaml",
        "checkpoint": "checkpoints/last.ckpt" if stage == "fit" else config.get("ckpt_path"),
        "command": "clusterlab " + shlex.join(sys.argv[1:]),
        "environment": environment(),
    }
    if config.kmeans_baseline and data.eval_set.labels.ge(0).any():
        report["kmeans"] = kmeans_baseline(
            data.eval_set.images, data.eval_set.labels, model.num_clusters, seed=config.seed_everything
        )
    (run_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, run_dir)


def environment() -> dict:
    """What a figure depends on besides the code and the seed: recorded in every metrics.json."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        # The libraries that draw the views (kornia), run the loop (Lightning) and compute neighbours
        # and k-means (faiss, scikit-learn): a new release can move a seed's figures.
        "packages": {name: installed_version(name) for name in RECORDED_PACKAGES},
        "faiss": faiss_wheels(),
        "clusterlab_source": source_revision(),
    }


# Installed versions recorded beside torch's (`environment`): `clusterlab env`'s, and scikit-learn's.
RECORDED_PACKAGES = (*PACKAGES, "scikit-learn")


def source_revision() -> str | None:
    """The git commit of the clusterlab source that runs, with "+uncommitted changes" when tracked
    files differ from it; None outside a git checkout (an installed wheel) or without git."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():  # a directory, or a file in a git worktree
        return None
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" +uncommitted changes" if changes.stdout.strip() else "")


def kmeans_baseline(images: torch.Tensor, labels: torch.Tensor, num_clusters: int, seed: int = 0) -> dict:
    """k-means on the raw pixels (scaled to [0, 1]) of the evaluation set: the baseline row."""
    from clusterlab.metrics import evaluate
    from clusterlab.neighbors import kmeans

    assignments, _ = kmeans(images.flatten(1).float() / 255.0, num_clusters, seed=seed)
    return evaluate(assignments, labels)


def restart_report(model) -> dict:
    scores = [None if math.isnan(v) else round(v, 6) for v in model.restart_scores.tolist()]
    return {
        "restarts": {
            "criterion": model.restart_criterion,
            "scores": scores,
            "selected": model.selected_restart,
            # stopped inside this restart (max_time): not compared with the finished ones
            **({"cut_short": model.restart_cut_short} if model.restart_cut_short is not None else {}),
        }
    }


def print_report(report: dict, run_dir: Path) -> None:
    """The report as a table of ACC / NMI / ARI / AMI / many-to-one ACC per head (and k-means), a
    collapse warning where the clusters collapsed, and the run directory."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    stage = "" if report["stage"] == "fit" else f" [{report['stage']}]"
    console.print(
        f"[bold]{report['method']}{stage}[/bold] on {report['dataset']} ({report['eval_split']}, "
        f"{report['num_samples']} images): seed {report['seed']}, {report['epochs']} epochs, "
        f"{report['wall_time_s']:.0f} s",
        highlight=False,
    )
    table = Table()
    for column in ("", "ACC", "NMI", "ARI", "AMI", "ACC many-to-one"):
        table.add_column(column, justify="left" if not column else "right")

    def row(label: str, results: dict) -> None:
        table.add_row(label, *(f"{results[k]:.4f}" if results.get(k) is not None else "-" for k in METRICS))

    heads = report.get("heads") or []
    for h, results in enumerate(heads):
        selected = " (selected)" if h == report["selected_head"] and len(heads) > 1 else ""
        row(f"{report['method']} head {h}{selected}", results)
    if report.get("vote"):
        row(f"{report['method']}, the {len(heads)} heads' vote", report)
    if "kmeans" in report:
        row("k-means (pixels)", report["kmeans"])
    console.print(table)
    restarts = report.get("restarts")
    if restarts:
        scores = " / ".join("-" if v is None else f"{v:.4f}" for v in restarts["scores"])
        console.print(
            f"restarts ({restarts['criterion']}, the lowest kept): {scores}; kept: restart "
            f"{restarts['selected']}",
            highlight=False,
        )
    for name, value in (report.get("diagnostics") or {}).items():
        console.print(f"{name}: {value:.4f}", highlight=False)
    if report.get("collapsed"):
        sizes = report["cluster_sizes"]
        console.print(
            f"[bold red]Warning: the clusters collapsed[/bold red]: the largest holds {max(sizes)} of "
            f"{sum(sizes)} "
            f"images and {sum(s > 0 for s in sizes)} of {len(sizes)} clusters are used (no label involved). "
            "Lower the learning rate, or train longer.",
            highlight=False,
        )
    console.print(f"Run directory: {run_dir}  (metrics.json, config.yaml, checkpoints/)")
