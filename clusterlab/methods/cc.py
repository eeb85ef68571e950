"""Contrastive Clustering (Li et al., AAAI 2021; shared/papers/cc-paper.md), Algorithm 1."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clusterlab.data.views import Views
from clusterlab.distributed import gather
from clusterlab.losses.cc import cluster_entropy, cluster_loss, instance_loss
from clusterlab.methods.base import ClusteringMethod, LRSchedulerCallable, OptimizerCallable
from clusterlab.nn.heads import ClusterHeads, KMeansHead, mlp


class CC(ClusteringMethod):
    """Instance- and cluster-level contrastive learning in the row and column space of the
    feature matrix; clusters are the argmax of the cluster head, so prediction is online.

    Args:
        num_clusters: M, the number of clusters.
        backbone: f, the pair construction backbone.
        views: the augmentation family T that both views T^a, T^b are drawn from.
        instance_dim: dimension of the row space of g_I (128 in the paper).
        instance_temperature: tau_I (0.5).
        cluster_temperature: tau_C (1.0).
        num_heads: cluster heads g_C trained side by side on the same features (1 in the paper).
            The head with the lowest cluster loss (Eq. 6, no label) over the last epoch is the one
            reported and predicted with: SCAN's and NNM's guard against a head that settles on a
            split class and a merged pair. The backbone sees the mean of the heads' losses, so its
            balance between L_ins and L_clu is the paper's whatever the number of heads.
        use_instance_loss, use_cluster_loss, use_cluster_entropy: switch each term of Eq. 7 on or
            off (paper Table 5: "CCH only" is use_instance_loss=false; "ICH only" is
            use_cluster_loss=false and use_cluster_entropy=false, and clusters then come from
            k-means in the instance space).
        optimizer: Adam, lr 3e-4, no weight decay in the paper.
        lr_scheduler: none in the paper.
    """

    def __init__(
        self,
        num_clusters: int,
        backbone: nn.Module,
        views: Views,
        instance_dim: int = 128,
        instance_temperature: float = 0.5,
        cluster_temperature: float = 1.0,
        num_heads: int = 1,
        use_instance_loss: bool = True,
        use_cluster_loss: bool = True,
        use_cluster_entropy: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            num_clusters, backbone, num_heads=num_heads, optimizer=optimizer, lr_scheduler=lr_scheduler
        )
        self.save_hyperparameters()
        if not (use_instance_loss or use_cluster_loss or use_cluster_entropy):
            raise ValueError(
                "CC needs at least one of use_instance_loss, use_cluster_loss, use_cluster_entropy"
            )
        self.views = views
        dim = backbone.out_dim
        self.instance_projector = mlp(dim, dim, instance_dim)  # g_I
        self.cluster_projector = ClusterHeads(
            dim, num_clusters, num_heads, hidden_dim=dim
        )  # g_C, softmax below
        # "ICH only" (Table 5) has no trained cluster head: clusters are k-means centres in the
        # instance space, refitted at every evaluation and kept for online prediction.
        self.kmeans = (
            None if use_cluster_loss or use_cluster_entropy else KMeansHead(num_clusters, instance_dim)
        )
        if self.kmeans is not None and num_heads != 1:
            raise ValueError(
                'CC without a cluster loss ("ICH only") clusters by k-means: num_heads must be 1'
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["image"]
        n = len(x)
        if "unlabeled_image" in batch:  # STL-10: unlabeled images train the instance head only
            x = torch.cat([x, batch["unlabeled_image"]])
        x_a, x_b = self.views(x), self.views(x)  # T^a(x), T^b(x), T^a, T^b ~ T
        h_a, h_b = self.backbone(x_a), self.backbone(x_b)  # h = f(T(x))
        # Both losses are over the global batch: rows for the instances, columns for the clusters.
        z_a, z_b = gather(self.instance_projector(h_a)), gather(self.instance_projector(h_b))  # z = g_I(h)
        # y = g_C(h) of every head: heads x N x M (gathered over the batch dimension).
        y_a, y_b = (
            gather(self.cluster_projector(h[:n]).softmax(-1).transpose(0, 1)).transpose(0, 1)
            for h in (h_a, h_b)
        )

        terms, head_losses = {}, torch.zeros(self.num_heads, device=x.device)
        if self.hparams.use_instance_loss:
            terms["instance"] = instance_loss(z_a, z_b, self.hparams.instance_temperature)  # L_ins, Eqs. 1-3
        if self.hparams.use_cluster_loss:  # Eqs. 4-5, Eq. 6's 1st term, per head
            per_head = torch.stack(
                [cluster_loss(a, b, self.hparams.cluster_temperature) for a, b in zip(y_a, y_b)]
            )
            terms["cluster"], head_losses = per_head.mean(), head_losses + per_head
        if self.hparams.use_cluster_entropy:  # - H(Y), second term of Eq. 6, per head
            per_head = torch.stack([-cluster_entropy(a, b) for a, b in zip(y_a, y_b)])
            terms["entropy"], head_losses = per_head.mean(), head_losses + per_head
        return self.objective(terms, head_losses)  # L = L_ins + L_clu, Eq. 7

    def cluster_logits(self, x: Tensor) -> Tensor:
        """c = argmax g_C(f(x)) (Algorithm 1, test); "ICH only": the nearest k-means centre of g_I(f(x))."""
        if self.kmeans is not None:
            return self.kmeans(self.instance_features(x))[None]
        return self.cluster_projector(self.backbone(x))

    def instance_features(self, x: Tensor) -> Tensor:
        """z = g_I(f(x)), the instance space (what "ICH only" clusters by k-means)."""
        return self.instance_projector(self.backbone(x))

    def evaluation_outputs(self, images: Tensor) -> dict[str, Tensor]:
        if self.kmeans is None:
            return super().evaluation_outputs(images)
        return {"features": self.instance_features(self.plain(images))}

    def evaluation_clusters(self, outputs: dict[str, Tensor], stage: str) -> Tensor:
        if self.kmeans is None:
            return super().evaluation_clusters(outputs, stage)
        self.kmeans.fit(outputs["features"])
        return self.kmeans(outputs["features"]).argmax(1)[:, None]

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """The instance features z = g_I(f(x)), the space of the paper's t-SNE plots (Fig. 4)."""
        return self.instance_features(self.plain(images))
