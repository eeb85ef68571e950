"""SCL's epoch-level work (scl-paper Algorithm 1): the pseudo labels and hard-sample weights,
refreshed once per epoch over the whole training set.

It works on the method's `sample_table`, a buffer module, so it is in the checkpoint. (The
semantic memory's update after every step needs no callback: SCL enqueues the step's keys where
it makes them.)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from torch import Tensor

from clusterlab.contracts import require
from clusterlab.distributed import broadcast
from clusterlab.neighbors import kmeans
from clusterlab.nn.memory import SampleTable
from clusterlab.seeding import derive_seed


@runtime_checkable
class PseudoLabelled(Protocol):
    """A method with per-sample pseudo labels of one or more clustering tasks."""

    sample_table: SampleTable  # labels and change counts per task and training-set index
    task_clusters: list[int]  # C_t of each task, in the order of sample_table's rows

    def task_outputs(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """For each task (sample_table's row order): its logits (B x C_t) and the features they
        come from (B x D), for a batch of uint8 images."""
        ...

    def prepare_refresh(self) -> None:
        """Called before each refresh predicts the training set (SCL: a k-means start of its
        classifiers at one epoch); nothing to do for most methods."""
        ...


class PseudoLabelRefresh(pl.Callback):
    """ "Updating assignments (Eq. 5) and weights (Eq. 6)" after every epoch, over the whole training set.

    Runs at the start of epochs 1, 2, ...: the same weights as the end of the epoch before, and
    whatever point a checkpoint was written at (Lightning saves at validation end, before the
    epoch's end hooks), a resumed run refreshes exactly once per epoch (`sample_table.epoch`).

    Each rank predicts its shard of the training set (`train_eval_dataloader`, through
    `clusterlab.passes.pass_over`), the predictions are gathered, and every rank writes the same
    table. The imbalance guard runs on rank 0, the only rank that receives the features it needs,
    and its result is broadcast.

    Args:
        imbalance_guard: refill clusters smaller than `min_cluster_fraction` x N / C by splitting
            the largest cluster (Online Deep Clustering, Zhan et al. 2020; scl-paper Sec. 4).
        min_cluster_fraction: the size below which a cluster is refilled, as a fraction of the mean
            cluster size N / C. ODC keeps clusters of at least 20 images with 1.28M images in 10k
            clusters (mean 128), a fraction of 0.16.
    """

    def __init__(self, imbalance_guard: bool = True, min_cluster_fraction: float = 0.15) -> None:
        self.imbalance_guard, self.min_cluster_fraction = imbalance_guard, min_cluster_fraction

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = pl_module.sample_table
        if trainer.current_epoch <= int(table.epoch) or len(table) == 0 or not pl_module.task_clusters:
            return
        pl_module.prepare_refresh()
        new_labels, features = self.predict_training_set(trainer, pl_module, features=self.imbalance_guard)
        for task, (labels, clusters) in enumerate(zip(new_labels, pl_module.task_clusters)):
            if self.imbalance_guard:
                min_size = self.min_cluster_fraction * len(labels) / clusters
                seed = derive_seed(trainer.current_epoch, task) % 2**31  # faiss takes a 32-bit seed
                guarded = (
                    split_small_clusters(labels, features[task], clusters, min_size, seed)
                    if trainer.global_rank == 0
                    else labels
                )
                labels = broadcast(guarded.to(pl_module.device)).cpu()
            table.update(task, labels)  # Eq. 6: count the changes
            table.cluster_sizes(task, clusters)  # counted here, once per refresh, not in a step
        table.epoch.fill_(trainer.current_epoch)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require(pl_module, PseudoLabelled, self)

    def predict_training_set(
        self, trainer: pl.Trainer, pl_module, features: bool = True
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """y_i = argmax_j p_ij for every training sample (Eq. 5), per task, on every rank; with
        `features`, each task's features too, on rank 0 only (None elsewhere, or without)."""

        tasks = range(len(pl_module.task_clusters))

        def step(batch: dict[str, Tensor]) -> dict[str, Tensor]:
            outputs = pl_module.task_outputs(batch["image"])
            return {
                **{f"label{t}": logits.argmax(1) for t, (logits, _) in enumerate(outputs)},
                **({f"features{t}": h.float() for t, (_, h) in enumerate(outputs)} if features else {}),
            }

        out = pl_module.pass_over_training_set(
            step,
            rank0_only=[f"features{t}" for t in tasks],  # the labels go to every rank
            description="Refreshing pseudo labels",
        )
        found = [out.get(f"features{t}") for t in tasks]
        return [out[f"label{t}"].cpu() for t in tasks], [h.cpu() if h is not None else None for h in found]


def split_small_clusters(
    labels: Tensor, features: Tensor, num_clusters: int, min_size: float, seed: int
) -> Tensor:
    """Online Deep Clustering's guard against degenerate clusters (Zhan et al., CVPR 2020, Sec. 3.3).

    Samples of every cluster smaller than `min_size` move to the nearest remaining cluster
    centroid. Each emptied cluster is then refilled with one half of the currently largest
    cluster, split in two by 2-means on the features.
    """
    labels = labels.clone()
    sizes = torch.bincount(labels, minlength=num_clusters)
    small = (sizes < min_size).nonzero().squeeze(1)
    if len(small) == 0 or len(small) == num_clusters:
        return labels
    kept = (sizes >= min_size).nonzero().squeeze(1)
    features = torch.nn.functional.normalize(features.float(), dim=1)
    centroids = torch.zeros(num_clusters, features.shape[1]).index_add_(0, labels, features)[kept]
    moving = torch.isin(labels, small)
    labels[moving] = kept[(features[moving] @ centroids.T).argmax(1)]
    for empty in small.tolist():
        largest = int(torch.bincount(labels, minlength=num_clusters).argmax())
        members = (labels == largest).nonzero().squeeze(1)
        if len(members) < 2:
            break
        halves, _ = kmeans(features[members], 2, seed=seed, n_init=3, iterations=20)
        if halves.min() == halves.max():  # identical features: split in two arbitrary halves
            halves = torch.arange(len(members)) % 2
        labels[members[halves == 1]] = empty
    return labels
