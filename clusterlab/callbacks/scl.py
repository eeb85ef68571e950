"""SCL's scheduled work (scl-paper Algorithm 1): the semantic memory's update after every step, and
the pseudo labels and hard-sample weights refreshed once per epoch.

Both work on the method's buffers (`semantic_memory`, `sample_table`), which are in the checkpoint.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor

from clusterlab.distributed import broadcast, gather
from clusterlab.neighbors import kmeans
from clusterlab.seeding import derive_seed


class SemanticMemoryUpdate(pl.Callback):
    """"After every backward pass, the representation k_i enqueues to M_{y_i} with the oldest one
    inside removed" (Sec. 3.1).

    The method leaves the keys of its step in `pl_module.pending_keys` (task -> keys, queue,
    sample index), gathered over all ranks, so every rank enqueues the same keys in the same order
    and the queues stay identical. With gradient accumulation every batch's backward pass enqueues
    its keys; the momentum encoder moves once per optimizer step.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:  # fmt: skip
        for task, (keys, queue, index) in pl_module.pending_keys.items():
            pl_module.semantic_memory[task].enqueue(keys, queue, index)
        pl_module.pending_keys.clear()


class PseudoLabelRefresh(pl.Callback):
    """"Updating assignments (Eq. 5) and weights (Eq. 6)" after every epoch, over the whole training set.

    Runs at the start of epochs 1, 2, ...: the same weights as the end of the epoch before, and
    whatever point a checkpoint was written at (Lightning saves at validation end, before the
    epoch's end hooks), a resumed run refreshes exactly once per epoch (`sample_table.epoch`).

    Each rank predicts its shard of the training set (`train_eval_dataloader`), the predictions are
    gathered, and every rank writes the same table. The imbalance guard runs on rank 0 and its
    result is broadcast.

    Contract with the method: `pl_module.assignments(images)` returns, for each labelled task in
    the order of `sample_table`'s rows, the task's logits (B x C_t) and the features they were
    computed from (B x D); `pl_module.task_clusters` lists C_t per row.

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
        new_labels, features = self.predict_training_set(trainer, pl_module)
        for task, (labels, clusters) in enumerate(zip(new_labels, pl_module.task_clusters)):
            if self.imbalance_guard:
                min_size = self.min_cluster_fraction * len(labels) / clusters
                seed = derive_seed(trainer.current_epoch, task) % 2**31  # faiss takes a 32-bit seed
                guarded = split_small_clusters(labels, features[task], clusters, min_size, seed) \
                    if trainer.global_rank == 0 else labels  # fmt: skip
                labels = broadcast(guarded.to(pl_module.device)).cpu()
            table.update(task, labels)  # Eq. 6: count the changes
        table.epoch.fill_(trainer.current_epoch)

    @torch.no_grad()
    def predict_training_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[list[Tensor], list[Tensor]]:
        """y_i = argmax_j p_ij for every training sample (Eq. 5), per task, with the features."""
        was_training = pl_module.training
        pl_module.eval()
        indices, logits, features = [], [], []
        for batch in trainer.datamodule.train_eval_dataloader():
            with trainer.precision_plugin.forward_context():  # the run's precision (AMP on GPUs)
                outputs = pl_module.assignments(batch["image"].to(pl_module.device))
            indices.append(batch["index"].to(pl_module.device))
            logits.append([p.argmax(1) for p, _ in outputs])
            features.append([f.float() for _, f in outputs])
        pl_module.train(was_training)

        index = gather(torch.cat(indices)).cpu()
        num_samples = len(pl_module.sample_table)
        new_labels, new_features = [], []
        for task in range(len(pl_module.task_clusters)):
            labels = torch.empty(num_samples, dtype=torch.long)
            labels[index] = gather(torch.cat([p[task] for p in logits])).cpu()
            feats = gather(torch.cat([f[task] for f in features])).cpu()
            ordered = torch.empty_like(feats)
            ordered[index] = feats
            new_labels.append(labels)
            new_features.append(ordered)
        return new_labels, new_features


def split_small_clusters(labels: Tensor, features: Tensor, num_clusters: int, min_size: float, seed: int) -> Tensor:
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
