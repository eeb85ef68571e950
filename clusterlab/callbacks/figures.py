"""The figures the papers show, drawn for every run: at the end of fit and of test.

- confusion.png: classes x clusters, clusters matched to classes by the Hungarian method
  (nnm-paper Fig. 4); only when the evaluation set has labels;
- confident.png: per cluster, the most and the least confident images (nnm-paper Fig. 5,
  scl-paper Fig. 6);
- embedding.png: a 2-D t-SNE of the features, coloured by cluster (cc-paper Fig. 4).

Written as PNG files into <run dir>/figures/ and logged as images to W&B when W&B is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from clusterlab.contracts import require
from clusterlab.metrics import contingency, evaluate, hungarian_match
from clusterlab.passes import pass_over


@runtime_checkable
class Clusterer(Protocol):
    """What the figures (and `predict`'s writer) read of a method: its clusters and features."""

    def assign(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cluster and its probability (B, B) of a batch of uint8 images."""
        ...

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B x D) of a batch of uint8 images, for the embedding plot."""
        ...


def collect_predictions(trainer: pl.Trainer | None, module, loader) -> dict[str, torch.Tensor]:
    """Index, cluster, confidence, features and label of every evaluation sample, on rank 0 only
    (which draws; the other ranks get {}), in dataset order (`clusterlab.passes.pass_over`; in the
    trainer's precision when there is one), on the CPU."""

    def step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cluster, confidence = module.assign(batch["image"])
        return {
            "cluster": cluster,
            "confidence": confidence,
            "features": module.embed(batch["image"]).float(),
            "label": batch["label"],
        }

    precision = trainer.precision_plugin if trainer is not None else None
    outputs = pass_over(
        module, loader, step, precision=precision, description="Drawing figures", rank0_only=True
    )
    return {key: value.cpu() for key, value in outputs.items()}


class ClusterFigures(pl.Callback):
    """Draws the confusion matrix, the most / least confident images per cluster and a t-SNE
    embedding of the final model on the evaluation set.

    Args:
        enabled: draw the figures at all.
        images_per_cluster: how many most (and least) confident images to show per cluster.
        embedding_points: t-SNE on at most this many samples (drawn at random, fixed seed).
        max_clusters: clusters shown in the image grid (the most populated ones).
    """

    def __init__(
        self,
        enabled: bool = True,
        images_per_cluster: int = 8,
        embedding_points: int = 3000,
        max_clusters: int = 20,
    ) -> None:
        self.enabled, self.images_per_cluster = enabled, images_per_cluster
        self.embedding_points, self.max_clusters = embedding_points, max_clusters

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.enabled:
            require(pl_module, Clusterer, self)

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.draw(trainer, pl_module, trainer.datamodule.val_dataloader())

    def on_test_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.draw(trainer, pl_module, trainer.datamodule.test_dataloader())

    def draw(self, trainer: pl.Trainer, module, loader) -> list[Path]:
        """Every rank computes its shard and sends it to rank 0 (collectives), which draws (none)."""
        if not self.enabled or trainer.fast_dev_run:
            return []
        outputs = collect_predictions(trainer, module, loader)
        if not trainer.is_global_zero:
            return []
        data = trainer.datamodule
        folder = Path(trainer.default_root_dir) / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        title = f"{type(module).__name__} on {data.source.name}"
        figures = []
        if (outputs["label"] >= 0).any():
            figures.append(("confusion", lambda p: confusion_figure(outputs, data.source.classes, title, p)))
        figures.append(
            (
                "confident",
                lambda p: confident_figure(
                    outputs, data.eval_set.images, self.images_per_cluster, self.max_clusters, title, p
                ),
            )
        )
        figures.append(("embedding", lambda p: embedding_figure(outputs, self.embedding_points, title, p)))
        paths = []
        for name, draw in figures:
            # A figure is a by-product: one that cannot be drawn is reported, never ends the run.
            try:
                paths.append(draw(folder / f"{name}.png"))
            except Exception as error:  # noqa: BLE001
                rank_zero_warn(f"figure {name}.png not drawn: {type(error).__name__}: {error}")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                for path in paths:
                    logger.log_image(key=f"figures/{path.stem}", images=[str(path)])
        return paths


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend: figures are drawn where there is no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(outputs: dict, class_names: list[str], title: str, path: Path) -> Path:
    plt = pyplot()
    known = outputs["label"] >= 0
    preds, labels = outputs["cluster"][known], outputs["label"][known]
    table = contingency(preds, labels).numpy().T  # rows: classes, columns: clusters
    matched = hungarian_match(preds, labels)  # cluster -> class
    # Matched clusters first, in the order of their class, then the unmatched ones.
    order = sorted(range(table.shape[1]), key=lambda c: matched.get(c, table.shape[0] + c))
    table = table[:, order]
    names = [class_names[i] if i < len(class_names) else str(i) for i in range(table.shape[0])]
    acc = evaluate(preds, labels)["acc"]
    side = max(5.0, 0.45 * max(table.shape) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    shown = ax.imshow(table / np.maximum(table.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    if max(table.shape) <= 30:
        for i in range(table.shape[0]):
            for j in range(table.shape[1]):
                if table[i, j]:
                    share = table[i, j] / max(table[i].sum(), 1)
                    ax.text(
                        j,
                        i,
                        str(table[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if share > 0.5 else "black",
                    )
    ax.set_xticks(range(table.shape[1]), [str(c) for c in order], fontsize=8)
    ax.set_yticks(range(table.shape[0]), names, fontsize=8)
    ax.set_xlabel("cluster (ordered by its Hungarian-matched class)")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}: confusion matrix, ACC {acc:.3f}")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def as_picture(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """A CxHxW image as imshow takes it, with the colour map a one-channel image needs."""
    array = image.numpy()
    return (array[0], "gray") if array.shape[0] == 1 else (array.transpose(1, 2, 0), None)


def confident_figure(
    outputs: dict, images: torch.Tensor, per_cluster: int, max_clusters: int, title: str, path: Path
) -> Path:
    plt = pyplot()
    clusters, counts = outputs["cluster"].unique(return_counts=True)
    shown = clusters[counts.argsort(descending=True)][:max_clusters].sort().values.tolist()
    columns = 2 * per_cluster + 1  # most confident | gap | least confident
    cell = 0.9
    fig, axes = plt.subplots(
        len(shown), columns, figsize=(columns * cell + 1.6, len(shown) * cell + 1.2), squeeze=False
    )
    for row, cluster in enumerate(shown):
        members = (outputs["cluster"] == cluster).nonzero().flatten()
        ranked = members[outputs["confidence"][members].argsort(descending=True)]
        most, least = ranked[:per_cluster], ranked.flip(0)[:per_cluster].flip(0)
        picks = (
            list(most)
            + [None] * (per_cluster - len(most))
            + [None]
            + [None] * (per_cluster - len(least))
            + list(least)
        )
        for col, pick in enumerate(picks):
            ax = axes[row, col]
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if pick is None:
                continue
            picture, cmap = as_picture(images[int(outputs["index"][pick])])
            ax.imshow(picture, cmap=cmap, interpolation="nearest")
            ax.set_title(f"{float(outputs['confidence'][pick]):.2f}", fontsize=6, pad=1)
        axes[row, 0].set_ylabel(
            f"cluster {cluster}\n({len(members)})", rotation=0, ha="right", va="center", fontsize=9
        )
    height = len(shown) * cell + 1.2
    fig.subplots_adjust(left=0.1, right=0.99, top=1 - 0.95 / height, bottom=0.01, wspace=0.08, hspace=0.35)
    fig.suptitle(f"{title}: images per cluster (probability above each)", fontsize=11, y=1 - 0.12 / height)
    for first, last, label in (
        (0, per_cluster - 1, "most confident"),
        (per_cluster + 1, 2 * per_cluster, "least confident"),
    ):
        left, right = axes[0, first].get_position(), axes[0, last].get_position()
        fig.text(
            (left.x0 + right.x1) / 2, left.y1 + 0.3 / height, label, ha="center", fontsize=10, weight="bold"
        )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def embedding_figure(outputs: dict, max_points: int, title: str, path: Path) -> Path:
    from sklearn.manifold import TSNE

    plt = pyplot()
    features, clusters = outputs["features"].double().numpy(), outputs["cluster"].numpy()
    # Only finite features, scaled to [-1, 1]: a diverged model's features (1e30, inf) crash t-SNE.
    finite = np.isfinite(features).all(1).nonzero()[0]
    if len(finite) < 5:
        raise ValueError(f"only {len(finite)} of {len(features)} samples have finite features")
    rng = np.random.default_rng(0)
    pick = rng.choice(finite, size=min(max_points, len(finite)), replace=False)
    scale = np.abs(features[pick]).max()
    chosen = features[pick] / (scale if scale > 0 else 1.0)
    # Identical features (a folder of copies of one image) crash the process, not just t-SNE:
    # scikit-learn's PCA start divides by the spread of the first component, 0, and its
    # Barnes-Hut tree then segfaults on the non-finite points. A layout of one point says nothing:
    # refuse it while it is an exception (the caller leaves the figure out and says why).
    # Features equal to 6 decimals count as equal: a spread of float noise would start the same way.
    distinct = len(np.unique(np.round(chosen, 6), axis=0))
    if distinct < 2:
        raise ValueError(f"the features of all {len(pick)} samples are the same: there is no layout to draw")
    points = TSNE(
        n_components=2, init="pca", perplexity=min(30.0, len(pick) - 1.0), random_state=0
    ).fit_transform(chosen)
    fig, ax = plt.subplots(figsize=(8, 7))
    cmap = plt.get_cmap("tab20" if clusters.max() >= 10 else "tab10")
    for cluster in np.unique(clusters[pick]):
        mine = clusters[pick] == cluster
        ax.scatter(points[mine, 0], points[mine, 1], s=6, color=cmap(cluster % cmap.N), label=str(cluster))
        centre = np.median(points[mine], axis=0)
        ax.annotate(
            str(cluster),
            centre,
            fontsize=12,
            weight="bold",
            ha="center",
            va="center",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.7},
        )
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(f"{title}: t-SNE of the features ({len(pick)} samples), colour = cluster")
    if len(np.unique(clusters)) <= 20:
        ax.legend(title="cluster", markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
