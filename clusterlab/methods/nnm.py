"""Nearest Neighbor Matching ("Nearest Neighbor Matching for Deep Clustering", Dang et al., CVPR 2021),
Algorithm 1.

Stage 1 (pretext) is `clusterlab.methods.SimCLR`, a run of its own. This method is stages 2 and 3:
when a `fit` starts it loads the pretext backbone named by `pretext_checkpoint` (without the
contrastive head), mines the top-K neighbours of every training image from its features (cached
beside the checkpoint, keyed by the checkpoint's content), hands them to the data module, and
trains the cluster heads by matching each sample with its pretext, local (batch) and global
(whole training set, previous epoch) neighbours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn

from clusterlab.callbacks.global_neighbors import GlobalNeighbors, HasFeaturesAndLogits
from clusterlab.data.views import Views
from clusterlab.distributed import gather
from clusterlab.errors import ConfigError
from clusterlab.losses.nnm import class_contrastive_loss, consistency_loss, entropy_loss
from clusterlab.methods.base import (
    ClusteringMethod,
    FolderRecipe,
    LRSchedulerCallable,
    OptimizerCallable,
)
from clusterlab.neighbors import knn
from clusterlab.nn.heads import ClusterHeads, kmeans_start
from clusterlab.pretext import load_pretext_backbone, mine_for_training, resolve_pretext_checkpoint


class NNM(ClusteringMethod, HasFeaturesAndLogits):
    """Cluster heads trained to agree with each sample's pretext, local and global neighbours.

    Args:
        num_clusters: C.
        backbone: the pretext's backbone architecture; its weights come from `pretext_checkpoint`.
        views: the strong views (flip, RandAugment with 4 random ops, Cutout), used for the anchor,
            the anchor's second view and the neighbour.
        pretext_checkpoint: the SimCLR checkpoint, a path or a glob; "{seed}" is replaced by this
            run's seed, and the newest match is used (e.g.
            runs/simclr_cifar10/*-seed{seed}/checkpoints/last.ckpt).
        num_heads: cluster heads, each a Linear(D, C) (3 in the paper; Table 4).
        num_neighbors: K, the mined pretext neighbours per image (20).
        global_neighbors: global neighbours searched per sample, one drawn at random (1; Table 5).
        entropy_weight: lambda of Eq. 11 (5).
        temperature: tau of the class contrastive losses (1).
        use_local_loss, use_global_loss, use_consistency_loss, use_class_contrastive_loss,
            use_entropy_loss: the ablations of Table 3 ("w/o consistent loss" turns off both
            consistency terms, "w/o class contrastive loss" both class terms).
        second_view: A = [p; p_aug] with a second strong view of the anchor (the authors' code);
            false: A = [p; p], Eq. 7 as printed.
        global_matching: what Eqs. 9-10 match with N_global(h)_b. "paper": the three blocks
            [p; N_local(p); N_pre(p)] of Eqs. 9-10. "code": the authors' code, [A; P] =
            [p; p_aug; N_pre(p); N_local(p)], four blocks (p twice when second_view is false).
        mining_metric: how the pretext neighbours are mined: "cosine" (L2-normalised features,
            inner product: SCAN's and the paper's "nearest") or "l2" (Euclidean distance on the
            raw features, the authors' code).
        head_init_epoch: None (the paper and the authors' code): the heads are trained from their
            random start only. An epoch E: at the start of epoch E every head is set to a spherical
            k-means clustering of the backbone features of the training images, each head its own
            k-means run (`clusterlab.nn.heads.kmeans_start`, as CC's head_init_epoch). 0 starts the
            heads at the pretext's k-means partition instead of a random one. No label is involved.
        head_init_temperature: the softmax temperature of that start (cosine to the centres divided
            by it; 0.1, as CC's).
        head_init_restarts: each head's k-means keeps the best of this many runs. 10: the heads
            start nearly alike; 1: each head starts in its own k-means optimum, so that the
            lowest-loss head is picked among different partitions.
        optimizer: Adam, lr 1e-4, weight decay 1e-4 in the paper (100 epochs, batch 200).
    """

    # On a folder of photos: the strong views, Adam 1e-3, the SimCLR pretext the folder command
    # trains first, and K neighbours for about half of a cluster's images (at most the paper's 20).
    folder_recipe = FolderRecipe(
        views="clusterlab.data.views.StrongViews",
        view_args={"crop_scale": [0.2, 1.0]},
        sizes=lambda num_images, num_clusters: {
            "num_neighbors": max(1, min(20, num_images // (2 * num_clusters)))
        },
        pretext_checkpoint=True,
    )

    def __init__(
        self,
        num_clusters: int,
        backbone: nn.Module,
        views: Views,
        pretext_checkpoint: str,
        num_heads: int = 3,
        num_neighbors: int = 20,
        global_neighbors: int = 1,
        entropy_weight: float = 5.0,
        temperature: float = 1.0,
        use_local_loss: bool = True,
        use_global_loss: bool = True,
        use_consistency_loss: bool = True,
        use_class_contrastive_loss: bool = True,
        use_entropy_loss: bool = True,
        second_view: bool = True,
        global_matching: Literal["paper", "code"] = "paper",
        mining_metric: Literal["cosine", "l2"] = "cosine",
        head_init_epoch: int | None = None,
        head_init_temperature: float = 0.1,
        head_init_restarts: int = 10,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            num_clusters, backbone, num_heads=num_heads, optimizer=optimizer, lr_scheduler=lr_scheduler
        )
        self.save_hyperparameters()
        matching = (use_local_loss or use_global_loss) and (
            use_consistency_loss or use_class_contrastive_loss
        )
        if not (matching or use_entropy_loss):
            raise ConfigError("NNM: every loss term is switched off; keep at least one")
        self.views = views
        self.cluster_head = ClusterHeads(backbone.out_dim, num_clusters, num_heads)
        self.global_neighbors = GlobalNeighbors(global_neighbors)

    def configure_callbacks(self):
        return [self.global_neighbors]

    # -- Algorithm 1, lines 1-3: pretext weights and mined neighbours --------------------------

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return

        def load() -> Path:
            path = resolve_pretext_checkpoint(self.hparams.pretext_checkpoint)
            # A resumed run then overwrites these weights with its own checkpoint's.
            load_pretext_backbone(path, self.backbone)
            return path

        mine_for_training(self, self.hparams.num_neighbors, load, metric=self.hparams.mining_metric)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.current_epoch == self.hparams.head_init_epoch:
            self.init_heads_from_kmeans()

    @torch.no_grad()
    def init_heads_from_kmeans(self) -> None:
        """Every head := the spherical k-means assignment of the backbone features h of the training
        images, as its one linear layer (weight c_k / (T |h|_median), bias 0: `kmeans_start`)."""

        def features(batch: dict[str, Tensor]) -> dict[str, Tensor]:
            return {"h": self.backbone(self.plain(batch["image"])).float()}

        h = self.pass_over_training_set(features).get("h")  # rank 0 only
        starts = kmeans_start(
            h,
            self.backbone.out_dim,
            self.num_clusters,
            self.num_heads,
            self.hparams.head_init_temperature,
            self.device,
            restarts=self.hparams.head_init_restarts,
        )
        for head, start in zip(self.cluster_head.heads, starts):
            head.weight.copy_(start)
            head.bias.zero_()
        if h is not None:
            rank_zero_info(
                f"NNM: epoch {self.current_epoch}: heads set to k-means of the features ({len(h)} images)"
            )

    # -- Algorithm 1, lines 5-15 --------------------------------------------------------------

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if "neighbor_image" not in batch:
            raise RuntimeError(
                "NNM: the batch has no 'neighbor_image': the mined neighbours were not handed to the data "
                "module"
            )
        anchor = batch["image"]
        f = self.backbone(self.views(anchor))  # f: embedded features of the anchors (line 8)
        p = self._global_probabilities(f)  # p: heads x B x C
        p_aug = (
            self._global_probabilities(self.backbone(self.views(anchor))) if self.hparams.second_view else p
        )
        n_pre = self._global_probabilities(
            self.backbone(self.views(batch["neighbor_image"]))
        )  # N_pre(p), line 9
        # Everything below is over the global batch.
        f = gather(f)
        # N_local(f): nearest other anchor, Eq. 6; searched where f is (faiss would mean a round
        # trip through the host every step).
        local = knn(f.detach(), 1, backend="torch")[0][:, 0]
        n_local = p[:, local]  # N_local(p)
        a, positives = torch.cat([p, p_aug], 1), torch.cat([n_pre, n_local], 1)  # A and P of Eqs. 7-8
        n_global = (
            self.global_neighbors.predictions(gather(batch["index"]))
            if self.hparams.use_global_loss
            else None
        )
        consistency, class_contrast = (
            self.hparams.use_consistency_loss,
            self.hparams.use_class_contrastive_loss,
        )
        tau = self.hparams.temperature

        heads: list[dict[str, Tensor]] = []
        for h in range(self.num_heads):
            head = {}
            if self.hparams.use_local_loss and consistency:
                head["local_consistency"] = consistency_loss(a[h], positives[h])  # Eq. 7
            if self.hparams.use_local_loss and class_contrast:
                head["local_class"] = class_contrastive_loss(a[h], positives[h], tau)  # Eq. 8
            if n_global is not None:  # from the second epoch on (line 10)
                samples = global_blocks(p[h], p_aug[h], n_pre[h], n_local[h], self.hparams.global_matching)
                blocks = len(samples) // len(p[h])
                target = n_global[h].to(samples).repeat(blocks, 1)  # N_global(h)_b for each block
                if consistency:
                    head["global_consistency"] = consistency_loss(samples, target)  # Eq. 9
                if class_contrast:
                    head["global_class"] = class_contrastive_loss(samples, target, tau)  # Eq. 10
            if self.hparams.use_entropy_loss:
                head["entropy"] = self.hparams.entropy_weight * entropy_loss(a[h])  # lambda x Eq. 5
            heads.append(head)
        terms = {
            name: torch.stack([head[name] for head in heads]).sum() for name in heads[0]
        }  # summed over heads
        head_losses = torch.stack([torch.stack(list(head.values())).sum() for head in heads])
        return self.objective(terms, head_losses=head_losses)  # Eq. 11 per head, heads summed

    def _global_probabilities(self, features: Tensor) -> Tensor:
        """Every head's cluster probabilities over the global batch: heads x (global B) x C."""
        return gather(self.cluster_head(features).float().softmax(-1).transpose(0, 1)).transpose(0, 1)

    # -- prediction ---------------------------------------------------------------------------

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features (N x D) and every head's logits (heads x N x C): what the global
        neighbour table is built from."""
        f = self.backbone(x)
        return f, self.cluster_head(f)


def global_blocks(p: Tensor, p_aug: Tensor, n_pre: Tensor, n_local: Tensor, form: str = "paper") -> Tensor:
    """The rows Eqs. 9-10 match with N_global(h)_b, block after block (each B x C): the paper's
    [p; N_local(p); N_pre(p)], or the authors' code's [p; p_aug; N_pre(p); N_local(p)]."""
    if form == "paper":
        return torch.cat([p, n_local, n_pre])
    if form == "code":
        return torch.cat([p, p_aug, n_pre, n_local])
    raise ConfigError(f"global_matching must be 'paper' or 'code', not {form!r}")
