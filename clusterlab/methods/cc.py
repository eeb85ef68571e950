"""Contrastive Clustering ("Contrastive Clustering", Li et al., AAAI 2021, arXiv:2009.09687), Algorithm 1."""

from __future__ import annotations

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn

from clusterlab.data.views import Views
from clusterlab.distributed import gather
from clusterlab.errors import ConfigError
from clusterlab.losses.cc import cluster_entropy, cluster_loss, instance_loss
from clusterlab.methods.base import ClusteringMethod, FolderRecipe, LRSchedulerCallable, OptimizerCallable
from clusterlab.methods.simclr import PHOTO_VIEWS
from clusterlab.nn.heads import ClusterHeads, KMeansHead, kmeans_start, mlp


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
            reported and predicted with, as SCAN and NNM do. The backbone sees the mean of the
            heads' losses, so its balance between L_ins and L_clu is the paper's whatever the
            number of heads. It does not reliably rescue a run whose partition crosses two
            classes: the heads share the backbone, and with it the crossing (figures:
            docs/results.md, CC).
        head_init_epoch: None (the paper): the cluster head is trained from its random start only.
            An epoch E: at the start of epoch E the cluster head is set to the spherical k-means
            clustering of the instance features z over the training set, as DEC/IDEC/DCN start
            their cluster centres from k-means on the learned features, and CC trains on from
            there. No label is involved. It can rescue a run whose head crossed two classes, but
            not always: CC's cluster loss can pull a head that starts at the classes back to the
            crossing partition (figures: docs/results.md, CC).
        head_init_temperature: the softmax temperature of the k-means head (cosine to the centres
            divided by it): 0.1, as prototype heads on normalised features use.
        use_instance_loss, use_cluster_loss, use_cluster_entropy: switch each term of Eq. 7 on or
            off (paper Table 5: "CCH only" is use_instance_loss=false; "ICH only" is
            use_cluster_loss=false and use_cluster_entropy=false, and clusters then come from
            k-means in the instance space).
        optimizer: Adam, lr 3e-4, no weight decay in the paper.
        lr_scheduler: none in the paper.
    """

    # On a folder of photos: SimCLR's views, Adam 1e-3; started from the SimCLR features' backbone
    # when the folder command trained them to choose K, as SCAN starts its clustering step.
    folder_recipe = FolderRecipe(
        views=PHOTO_VIEWS["class_path"], view_args=PHOTO_VIEWS["init_args"], warm_start=True
    )

    def __init__(
        self,
        num_clusters: int,
        backbone: nn.Module,
        views: Views,
        instance_dim: int = 128,
        instance_temperature: float = 0.5,
        cluster_temperature: float = 1.0,
        num_heads: int = 1,
        head_init_epoch: int | None = None,
        head_init_temperature: float = 0.1,
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
            raise ConfigError(
                "CC needs at least one of use_instance_loss, use_cluster_loss, use_cluster_entropy"
            )
        self.views = views
        dim = backbone.out_dim
        self.instance_projector = mlp(dim, dim, instance_dim)  # g_I
        # g_C, softmax below. Drawn in every configuration, "ICH only" too, so that the random
        # stream after it does not depend on which terms are on.
        trained_head = ClusterHeads(dim, num_clusters, num_heads, hidden_dim=dim)
        # "ICH only" (Table 5) has no trained cluster head: clusters are k-means centres in the
        # instance space, refitted at every evaluation and kept for online prediction.
        self.cluster_head = (
            trained_head
            if use_cluster_loss or use_cluster_entropy
            else KMeansHead(num_clusters, instance_dim)
        )
        if self.cluster_head.fitted and num_heads != 1:
            raise ConfigError(
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
        # y = g_C(h) of every head: heads x N x M (gathered over the batch dimension). "ICH only"
        # has no g_C (its head is k-means, fitted at evaluation) and no term that reads y.
        if not self.cluster_head.fitted:
            y_a, y_b = (
                gather(self.cluster_head(h[:n]).softmax(-1).transpose(0, 1)).transpose(0, 1)
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

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.current_epoch == self.hparams.head_init_epoch and not self.cluster_head.fitted:
            self.init_heads_from_kmeans()

    @torch.no_grad()
    def init_heads_from_kmeans(self) -> None:
        """g_C := the spherical k-means assignment of z = g_I(h), as one MLP: g_I's hidden layer,
        then logits z . c_k / (T |z|_median) with z = W a + b written out, so logits = (C W) a + C b.
        The argmax is exactly k-means' (|z| does not change it). Every rank sets the same weights:
        the features are gathered to rank 0, which broadcasts the scale and (KMeansHead.fit) the
        centres."""

        def instance(batch: dict[str, Tensor]) -> dict[str, Tensor]:
            return {"z": self.instance_features(self.plain(batch["image"])).float()}

        z = self.pass_over_training_set(instance).get("z")  # rank 0 only
        hidden, output = self.instance_projector[0], self.instance_projector[2]  # z = output(relu(hidden(h)))
        starts = kmeans_start(
            z,
            self.hparams.instance_dim,
            self.num_clusters,
            self.num_heads,
            self.hparams.head_init_temperature,
            self.device,
        )
        for head, start in zip(self.cluster_head.heads, starts):
            head[0].load_state_dict(hidden.state_dict())
            head[2].weight.copy_(start @ output.weight)
            head[2].bias.copy_(start @ output.bias)
        if z is not None:
            rank_zero_info(
                f"CC: epoch {self.current_epoch}: cluster head set to k-means of the instance features "
                f"({len(z)} images)"
            )

    def cluster_features(self, x: Tensor) -> Tensor:
        """h = f(x), which g_C reads (c = argmax g_C(f(x)), Algorithm 1, test); "ICH only": z = g_I(f(x)),
        which its k-means head reads."""
        return self.instance_features(x) if self.cluster_head.fitted else self.backbone(x)

    def instance_features(self, x: Tensor) -> Tensor:
        """z = g_I(f(x)), the instance space (what "ICH only" clusters by k-means)."""
        return self.instance_projector(self.backbone(x))

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """The instance features z = g_I(f(x)), the space of the paper's t-SNE plots (Fig. 4)."""
        return self.instance_features(self.plain(images))
