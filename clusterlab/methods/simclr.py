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

from clusterlab.callbacks.momentum import HasMomentumEncoder, MomentumEncoder
from clusterlab.data.views import Views
from clusterlab.distributed import broadcast_object, gather
from clusterlab.losses.common import nt_xent
from clusterlab.losses.nnm import moco_loss
from clusterlab.methods.base import ClusteringMethod, FolderRecipe, LRSchedulerCallable, OptimizerCallable
from clusterlab.neighbors import knn, neighbor_agreement
from clusterlab.nn.heads import KMeansHead, mlp
from clusterlab.nn.memory import KeyQueues

# SimCLR's views for photos (random resized crop 0.2-1, colour jitter of strength 1 and any hue
# with p 0.8, random greyscale p 0.5): the folder command's pretext, and CC's and SCL's views on a
# folder. Size, flip and standardisation are the folder command's.
PHOTO_VIEWS = {
    "class_path": "clusterlab.data.views.SimCLRViews",
    "init_args": {"crop_scale": [0.2, 1.0], "strength": 1.0, "hue": 0.5, "grayscale_p": 0.5},
}


class SimCLR(ClusteringMethod, HasMomentumEncoder):
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

    # On a folder of photos (the folder command's features, K's and NNM's pretext): tau 0.5, Adam 1e-3.
    folder_recipe = FolderRecipe(
        views=PHOTO_VIEWS["class_path"], view_args=PHOTO_VIEWS["init_args"], args={"temperature": 0.5}
    )

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
        self.cluster_head = KMeansHead(num_clusters, dim)  # "Pretext + K-means", nnm-paper Table 2
        self.momentum_encoder = nn.ModuleDict()
        if queue_size:  # MoCo: a key encoder (the moving average of the query encoder) and its queue
            self.momentum_encoder.update(
                {
                    "backbone": copy.deepcopy(backbone),
                    "contrastive_head": copy.deepcopy(self.contrastive_head),
                }
            )
            self.momentum_encoder.requires_grad_(False)
            self.queue = KeyQueues(1, queue_size, projection_dim)

    def configure_callbacks(self) -> list:
        # MoCo's key encoder moves after every optimizer step and takes the query encoder's buffers.
        return [MomentumEncoder(self.hparams.momentum, copy_buffers=True)] if self.hparams.queue_size else []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["image"]
        if "unlabeled_image" in batch:  # STL-10: the pretext also learns from the unlabeled split
            x = torch.cat([x, batch["unlabeled_image"]])
        u = self.contrastive_head(self.backbone(self.views(x)))  # u = g(f(s)), s a random view
        if not self.hparams.queue_size:
            u_prime = self.contrastive_head(self.backbone(self.views(x)))  # u' of another view s'
            return self.objective(
                {"simclr": nt_xent(gather(u), gather(u_prime), self.hparams.temperature)}
            )  # Eq. 1
        with torch.no_grad():
            key_encoder = self.momentum_encoder
            keys = gather(key_encoder["contrastive_head"](key_encoder["backbone"](self.views(x))))
        loss = moco_loss(gather(u), keys, self.queue.flat_keys(), self.hparams.temperature)  # Eq. 2
        # The gathered keys are the same on every rank, so every rank's queue stays identical.
        unknown = torch.full((len(keys),), -1, dtype=torch.long, device=keys.device)  # MoCo keeps no owners
        self.queue.enqueue(F.normalize(keys, dim=1), torch.zeros_like(unknown), unknown)
        return self.objective({"moco": loss})

    def cluster_features(self, x: Tensor) -> Tensor:
        """The L2-normalised backbone features: what k-means clusters, and NNM mines neighbours from."""
        return F.normalize(self.backbone(x).float(), dim=1)

    def evaluation_clusters(self, outputs: dict[str, Tensor], stage: str) -> Tensor | None:
        clusters = super().evaluation_clusters(outputs, stage)  # fits the k-means head
        self.knn_monitor(stage, outputs.get("features"), outputs.get("label"))
        return clusters

    def knn_monitor(self, stage: str, features: Tensor | None, labels: Tensor | None) -> None:
        """Label agreement of each evaluation image's top-k neighbours (labels only report),
        searched on rank 0 (which holds the features) and broadcast."""
        agreement = None
        if features is not None:
            neighbors, _ = knn(features, min(self.hparams.knn_k, len(features) - 1))
            agreement = neighbor_agreement(neighbors, labels)
        agreement = broadcast_object(agreement)
        if agreement is not None:
            self.diagnostics["knn_agreement"] = agreement
            self.log(f"{stage}/knn_agreement", agreement, sync_dist=True)  # the same on every rank
