"""SimCLR, the pretext of NNM (nnm-paper Eq. 1; MoCo, Eq. 2, as an option for large data sets).

The backbone learns instance-discriminative features; NNM then mines each image's nearest
neighbours from them. Clusters are reported by k-means on the (L2-normalised) backbone features,
the "Pretext + K-means" row of nnm-paper Table 2, and an online kNN monitor logs how often an
evaluation image's nearest neighbours share its label (where labels exist).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterlab.data.views import Views
from clusterlab.distributed import gather
from clusterlab.losses.common import nt_xent
from clusterlab.losses.nnm import moco_loss
from clusterlab.methods.base import ClusteringMethod, LRSchedulerCallable, OptimizerCallable
from clusterlab.neighbors import knn, neighbor_agreement
from clusterlab.nn.heads import mlp


class SimCLR(ClusteringMethod):
    """Contrastive pretext: two random views of every image, NT-Xent over the global batch.

    Args:
        num_clusters: C, for the k-means evaluation.
        backbone: the network NNM will load (without the contrastive head).
        views: the view family (SCAN: crop 0.2-1, flip, jitter 0.4/0.4/0.4/0.1 p 0.8, grey p 0.2).
        projection_dim: output of the contrastive head Linear(D, D)-ReLU-Linear(D, 128).
        temperature: tau of Eq. 1 (SCAN: 0.1).
        queue_size: 0: SimCLR (Eq. 1). M > 0: MoCo (Eq. 2) with a queue of M keys from a momentum
            encoder, for data sets too large for big batches.
        momentum: MoCo's key-encoder momentum.
        knn_k: neighbours of the kNN monitor (and of NNM's mining: 20).
        optimizer, lr_scheduler: SCAN: SGD lr 0.4, momentum 0.9, wd 1e-4, cosine, 500 epochs.
    """

    def __init__(
        self,
        num_clusters: int,
        backbone: nn.Module,
        views: Views,
        projection_dim: int = 128,
        temperature: float = 0.1,
        queue_size: int = 0,
        momentum: float = 0.999,
        knn_k: int = 20,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_clusters, backbone, num_heads=1, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters()
        self.views = views
        dim = backbone.out_dim
        self.contrastive_head = mlp(dim, dim, projection_dim)
        self.init_kmeans_clusters(dim)
        if queue_size:
            self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
            self.key_head = copy.deepcopy(self.contrastive_head).requires_grad_(False)
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
            self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hp = self.hparams
        x = batch["image"]
        if "unlabeled_image" in batch:  # STL-10: the pretext also learns from the unlabeled split
            x = torch.cat([x, batch["unlabeled_image"]])
        u = self.contrastive_head(self.backbone(self.views(x)))  # u = g(f(s)), s a random view
        if not hp.queue_size:
            u_prime = self.contrastive_head(self.backbone(self.views(x)))  # u' of another view s'
            return self.objective({"simclr": nt_xent(gather(u), gather(u_prime), hp.temperature)})  # Eq. 1
        with torch.no_grad():
            self._momentum_update()
            keys = gather(self.key_head(self.key_backbone(self.views(x))))
        loss = moco_loss(gather(u), keys, self.queue.clone(), hp.temperature)  # Eq. 2
        self._enqueue(F.normalize(keys, dim=1))
        return self.objective({"moco": loss})

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.hparams.momentum
        for key, query in ((self.key_backbone, self.backbone), (self.key_head, self.contrastive_head)):
            for k, q in zip(key.parameters(), query.parameters()):
                k.mul_(m).add_(q.detach(), alpha=1 - m)
            for k, q in zip(key.buffers(), query.buffers()):
                k.copy_(q)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        # The gathered keys are the same on every rank, so every rank's queue stays identical.
        size = len(self.queue)
        rows = (self.queue_pointer + torch.arange(len(keys), device=keys.device)) % size
        self.queue[rows[-size:]] = keys[-size:].to(self.queue.dtype)
        self.queue_pointer.copy_((self.queue_pointer + len(keys)) % size)

    def cluster_features(self, x: Tensor) -> Tensor:
        """The L2-normalised backbone features: what NNM mines neighbours from."""
        return F.normalize(self.backbone(x).float(), dim=1)

    def cluster_logits(self, x: Tensor) -> Tensor:
        return self.kmeans_logits(x)

    def on_eval_features(self, stage: str, features: Tensor, labels: Tensor) -> None:
        """kNN monitor: label agreement of each evaluation image's top-k neighbours (labels only report)."""
        neighbors, _ = knn(features, min(self.hparams.knn_k, len(features) - 1))
        agreement = neighbor_agreement(neighbors, labels)
        if agreement is not None:
            self.diagnostics["knn_agreement"] = agreement
            self.log(f"{stage}/knn_agreement", agreement, sync_dist=False)
